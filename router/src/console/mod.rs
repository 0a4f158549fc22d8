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

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::command::{Command, CommandError};
use crate::client::ClientConn;
use crate::client_error::ClientError;
use crate::protocol::backend::sqlstate;
use crate::protocol::{cstr, tag};
use crate::routing::RoutingTable;
use crate::shared::Shared;
use crate::startup::ConsoleLogin;
use crate::stats::Database;

/// How long PAUSE waits for the transactions open to end before it answers
/// (new ones are held from the start).
fn pause_wait(shared: &Shared) -> Duration {
    shared.runtime.load().config.drain_timeout()
}

/// The routing tables sessions begin their transactions on: the primary's
/// and each standby's of the read port.
fn tables(shared: &Shared) -> Vec<Arc<RoutingTable>> {
    let mut tables = vec![shared.routing.clone()];
    tables.extend(shared.read_pool.routes().iter().map(|r| r.table.clone()));
    tables
}

/// Sets `PAUSE db` of `db` on every routing table.
fn hold_database(shared: &Shared, db: &Database, held: bool) {
    for table in tables(shared) {
        table.hold_database(db.gate(), held);
    }
}

/// `RECONNECT [db]` on the primary's pools and the read port's.
fn reconnect(shared: &Shared, database: Option<&str>) {
    let mut victims = shared.pools.reconnect(database);
    for route in shared.read_pool.routes() {
        victims.extend(route.pools.reconnect(database));
    }
    tokio::spawn(crate::pool::close_all(victims));
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
    let done = command.tag();
    match command {
        Command::Show(what) => {
            let set = show::answer(shared, what);
            wire::result_set(out, &set, done);
        }
        Command::Pause(None) => {
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
            wire::command_complete(out, done);
        }
        Command::Pause(Some(database)) => {
            let db = shared.databases.get(&database);
            hold_database(shared, &db, true);
            let busy = || -> usize {
                tables(shared)
                    .iter()
                    .map(|table| table.busy_in(db.index))
                    .sum()
            };
            // Only the last busy session of an epoch wakes a whole-router
            // PAUSE; a database's own count is looked at every few
            // milliseconds instead (a console command, not the relay).
            let waited = tokio::time::timeout(pause_wait(shared), async {
                while busy() > 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
            if waited.is_err() {
                wire::notice(
                    out,
                    &format!(
                        "{database} paused, but {} of its sessions still have a transaction open after router.drain_timeout_ms",
                        busy()
                    ),
                );
            }
            wire::command_complete(out, done);
        }
        Command::Resume(database) => {
            if database.is_none() {
                shared.routing.set_held(false);
            }
            for db in shared.databases.list() {
                if database.as_ref().is_none_or(|name| *name == db.name) && db.held() {
                    hold_database(shared, &db, false);
                    db.wake();
                }
            }
            wire::command_complete(out, done);
        }
        Command::Reconnect(database) => {
            reconnect(shared, database.as_deref());
            wire::command_complete(out, done);
        }
        Command::Kill(database) => {
            // As PgBouncer: the database's clients and server connections
            // go now, and its new clients wait until RESUME.
            let db = shared.databases.get(&database);
            hold_database(shared, &db, true);
            let killed = shared.registry.kill_database(&database);
            reconnect(shared, Some(&database));
            tracing::warn!(user, database, clients = killed, "admin console: KILL");
            wire::command_complete(out, done);
        }
        Command::Reload => match crate::reload::reload(shared).await {
            Ok(()) => wire::command_complete(&mut client.wbuf, done),
            Err(e) => wire::error(
                &mut client.wbuf,
                sqlstate::FEATURE_NOT_SUPPORTED,
                &format!("reload refused, the configuration in force stays: {e}"),
                None,
            ),
        },
        Command::KillClient(id) => {
            if shared.registry.kill(id) {
                wire::command_complete(out, done);
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
                    wire::command_complete(out, done);
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
