//! What both listeners (the main port in `router.rs`, the read-only port
//! in `read_port.rs`) do with an accepted connection: count it
//! ([`ClientSlot`]), refuse it past `router.max_client_connections`, or
//! serve it to its end: the startup handshake, then the session's relay or
//! the admin console.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client_error::ClientError;
use crate::console;
use crate::net;
use crate::protocol::backend::sqlstate;
use crate::session::Session;
use crate::shared::Shared;
use crate::startup::{self, Started};
use crate::stats::ClientEntry;

/// Counts a live client; decrements on drop.
pub(crate) struct ClientSlot(pub(crate) Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn refuse(mut tcp: TcpStream, max: usize, slot: ClientSlot) {
    let mut buf = BytesMut::new();
    ClientError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        format!("sorry, too many clients already (router.max_client_connections = {max})"),
        None,
    )
    .write(&mut buf);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = tcp.write_all(&buf).await;
        let _ = tcp.shutdown().await;
    })
    .await;
    drop(slot);
}

/// Serves one accepted connection to its end: the startup handshake, then
/// the session.
pub(crate) async fn serve_client(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    kill: CancellationToken,
    read_only: bool,
) {
    if let Err(e) = net::tune(&tcp) {
        tracing::debug!(error = %e, "could not tune client socket");
    }
    let local = tcp.local_addr().ok();
    let connect_time = std::time::SystemTime::now();
    let rt = shared.runtime.load_full();
    let started = tokio::select! {
        // The handshake's log lines name the client (`client` in JSON
        // logs); the relay after it is not instrumented, to keep span
        // enter and exit off the per-message path.
        r = tokio::time::timeout(
            rt.config.login_timeout(),
            startup::start(&shared, &rt, tcp, peer, read_only)
                .instrument(tracing::info_span!("client", client = %peer)),
        ) => r,
        _ = kill.cancelled() => return,
    };
    drop(rt);
    match started {
        Err(_) => tracing::info!(%peer, "client did not complete its startup in time"),
        Ok(Err(crate::client::Ended)) | Ok(Ok(None)) => {}
        Ok(Ok(Some((client, started)))) => {
            // KILL_CLIENT ends this client alone; the router's own kill
            // (end of the shutdown drain) still reaches it.
            let kill = kill.child_token();
            let tls = client.stream.is_tls();
            match started {
                Started::Session(ready) => {
                    let registered = shared.registry.register(ClientEntry {
                        id: ready.cancel.pid,
                        user: ready.client_user.clone(),
                        pool_user: ready.login.user.clone(),
                        database: ready.login.database.clone(),
                        peer,
                        local,
                        connect_time,
                        tls,
                        application_name: application_name(&ready.login.params),
                        console: false,
                        waiting_since: Default::default(),
                        kill: kill.clone(),
                    });
                    let session = Session::new(shared, client, ready, registered, shutdown, kill);
                    if read_only {
                        session.read_only().run().await;
                    } else {
                        session.run().await;
                    }
                }
                Started::Console(login) => {
                    let registered = shared.registry.register(ClientEntry {
                        id: login.cancel.pid,
                        user: login.user.clone(),
                        pool_user: login.user.clone(),
                        database: login.database.clone(),
                        peer,
                        local,
                        connect_time,
                        tls,
                        application_name: login.application_name.clone(),
                        console: true,
                        waiting_since: Default::default(),
                        kill: kill.clone(),
                    });
                    console::serve(shared, client, login, shutdown, kill).await;
                    drop(registered);
                }
            }
        }
    }
}

fn application_name(params: &[(String, String)]) -> String {
    params
        .iter()
        .find(|(k, _)| k == "application_name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}
