//! The admin console, PgBouncer's on the router's own port: a client that
//! logs in to the virtual database `pgbouncer` (or `hapg`) as a user of
//! `admin.admin_users` (every command) or `admin.stats_users` (SHOW only)
//! is served here, after the same startup and authentication as any client
//! (`startup.rs`), instead of being relayed. Simple-query protocol only.
//!
//! * `command.rs`: the commands, parsed (pure);
//! * `show.rs`: the SHOW answers, from the router's shared state;
//! * `wire.rs`: the answers encoded with the `pgwire` crate.

mod command;
mod show;
mod wire;

pub(crate) use self::show::pool_rows;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::command::{Command, CommandError};
use crate::client::ClientConn;
use crate::client_error::ClientError;
use crate::protocol::backend::sqlstate;
use crate::protocol::{cstr, tag};
use crate::router::Router;
use crate::shared::Shared;
use crate::startup::ConsoleLogin;

/// The virtual databases of the console.
pub(crate) const DATABASES: [&str; 2] = ["pgbouncer", "hapg"];

pub(crate) fn is_console_database(database: &str) -> bool {
    DATABASES.contains(&database)
}

/// How long PAUSE waits for the transactions open to end before it answers
/// (new ones are held from the start).
fn pause_wait(shared: &Shared) -> Duration {
    shared.runtime.load().config.drain_timeout()
}

/// Serves one console client until it leaves, is killed, or the router stops.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut client: ClientConn,
    login: ConsoleLogin,
    shutdown: CancellationToken,
    kill: CancellationToken,
) {
    let _cancel = login.cancel;
    loop {
        let frame = tokio::select! {
            _ = kill.cancelled() => {
                client.end_with(ClientError::stopping()).await;
                return;
            }
            _ = shutdown.cancelled() => {
                client.end_with(ClientError::stopping()).await;
                return;
            }
            frame = client.read_frame() => frame,
        };
        let Ok((kind, body)) = frame else {
            return;
        };
        match kind {
            tag::frontend::QUERY => {
                let text = cstr(&body)
                    .map(|(text, _)| String::from_utf8_lossy(text).into_owned())
                    .unwrap_or_default();
                run(&shared, &mut client, &login.user, login.admin, &text).await;
            }
            tag::frontend::TERMINATE => return,
            _ => {
                // As PgBouncer: the console speaks the simple-query protocol only.
                client
                    .end_with(ClientError::fatal(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the admin console accepts simple queries only (no extended protocol)",
                        None,
                    ))
                    .await;
                return;
            }
        }
        wire::ready(&mut client.wbuf);
        if client.flush().await.is_err() {
            return;
        }
    }
}

/// Runs one query's text and writes its answer (not ReadyForQuery).
async fn run(shared: &Arc<Shared>, client: &mut ClientConn, user: &str, admin: bool, text: &str) {
    let out = &mut client.wbuf;
    let command = match command::parse(text) {
        Ok(command) => command,
        Err(CommandError::Empty) => {
            // An empty query, as Postgres answers it.
            out.extend_from_slice(&[b'I', 0, 0, 0, 4]);
            return;
        }
        Err(e) => {
            wire::error(
                out,
                sqlstate::SYNTAX_ERROR,
                &format!("{e}; the console accepts: {}", command::accepted()),
                None,
            );
            return;
        }
    };
    if !command.read_only() && !admin {
        tracing::warn!(
            user,
            command = command.tag(),
            "admin console: refused to a stats user"
        );
        wire::error(
            out,
            sqlstate::INSUFFICIENT_PRIVILEGE,
            &format!(
                "permission denied: {} needs a user in admin.admin_users (\"{user}\" is a stats user: SHOW only)",
                command.tag()
            ),
            None,
        );
        return;
    }
    if !command.read_only() {
        tracing::info!(user, command = command.tag(), "admin console command");
    }
    match command {
        Command::Show(what) => {
            let set = show::answer(shared, what);
            wire::result_set(out, &set, command.tag());
        }
        Command::Pause => {
            shared.routing.set_held(true);
            // PgBouncer's PAUSE answers once the server connections are
            // released: here once no transaction is open any more.
            let mut idle = shared.routing.subscribe_idle();
            let waited = tokio::time::timeout(pause_wait(shared), async {
                while shared.routing.busy_total() > 0 {
                    if idle.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            if waited.is_err() {
                wire::notice(
                    out,
                    &format!(
                        "paused, but {} sessions still have a transaction open after router.drain_timeout_ms",
                        shared.routing.busy_total()
                    ),
                );
            }
            wire::command_complete(out, command.tag());
        }
        Command::Resume => {
            shared.routing.set_held(false);
            wire::command_complete(out, command.tag());
        }
        Command::Reconnect => {
            let victims = shared.pools.reconnect();
            tokio::spawn(crate::pool::close_all(victims));
            wire::command_complete(out, command.tag());
        }
        Command::Reload => match Router::of(shared.clone()).reload().await {
            Ok(()) => wire::command_complete(&mut client.wbuf, command.tag()),
            Err(e) => wire::error(
                &mut client.wbuf,
                sqlstate::FEATURE_NOT_SUPPORTED,
                &format!("reload refused, the configuration in force stays: {e}"),
                None,
            ),
        },
        Command::KillClient(id) => {
            if shared.registry.kill(id) {
                wire::command_complete(out, command.tag());
            } else {
                wire::error(
                    out,
                    sqlstate::UNDEFINED_OBJECT,
                    &format!("no client {id} (SHOW CLIENTS lists them, column ptr)"),
                    None,
                );
            }
        }
        Command::Shutdown => {
            let stop = shared.stop.lock().ok().and_then(|s| s.clone());
            match stop {
                Some(stop) => {
                    tracing::warn!(user, "admin console: SHUTDOWN");
                    wire::command_complete(out, command.tag());
                    stop.cancel();
                }
                None => wire::error(
                    out,
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the router is not serving",
                    None,
                ),
            }
        }
    }
}
