//! Opening Postgres connections the way every hapg component does: TLS when the
//! server offers it (encryption without certificate verification, as libpq's
//! `sslmode=require`), keepalives, `TCP_USER_TIMEOUT`, a connect timeout, and
//! a task that drives the connection and forwards NOTIFY messages.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Accepts any server certificate: hapg nodes use self-signed certificates, and
/// tokio-postgres has no `verify-full`; this gives the `require` guarantee
/// (encrypted, not authenticated) that pg_auto_failover gives by default.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client configuration of every hapg connection to Postgres (keepers,
/// CLI, monitor, router): encryption without certificate verification.
pub fn encrypt_only_client_config() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
        .with_no_client_auth()
}

/// The TLS connector every hapg client connection uses.
pub fn tls_connector() -> MakeRustlsConnect {
    MakeRustlsConnect::new(encrypt_only_client_config())
}

/// `TCP_USER_TIMEOUT` of every hapg connection to Postgres over TCP (a Unix
/// socket has none): past the keepalive probes' 5 + 2 s.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected client, with the NOTIFY messages its connection received.
pub struct Connection {
    /// The client.
    pub client: Client,
    /// Notifications, in arrival order; closed when the connection ends.
    pub notifications: mpsc::UnboundedReceiver<Notification>,
}

/// Connects with `config`, applying hapg's defaults for whatever it leaves unset.
pub async fn connect(
    mut config: Config,
    connect_timeout: Duration,
) -> Result<Connection, tokio_postgres::Error> {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(connect_timeout);
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    // Keepalives probe only an idle connection: a statement sent to a peer
    // that went silent (cut off, powered off) stays unacknowledged, and the
    // kernel would retransmit it for some 15 minutes before giving up. A
    // caller's own timeout gives up on the call but not on the connection,
    // which then holds every later call. With a user timeout the connection
    // ends once data goes unacknowledged this long (and, idle, at the first
    // keepalive probe past it), and the caller opens a new one.
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    let (client, mut connection) = config.connect(tls_connector()).await?;
    let (sender, notifications) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    // The receiver going away only means nobody listens any more.
                    let _ = sender.send(n);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "connection closed");
                    break;
                }
            }
        }
    });
    Ok(Connection {
        client,
        notifications,
    })
}

/// Parses a `pg_lsn` text value (`16/B374D848`) into a byte position.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    Some((high << 32) | low)
}

/// Formats a byte position as `pg_lsn` text.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// A connection string for display: any password replaced by `****`.
pub fn redact_uri(uri: &str) -> String {
    let mut out = uri.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        if let Some(at) = out[rest_start..].find('@').map(|i| i + rest_start) {
            if let Some(colon) = out[rest_start..at].find(':').map(|i| i + rest_start) {
                out.replace_range(colon + 1..at, "****");
            }
        }
    }
    if let Some(start) = out.find("password=") {
        let value_start = start + "password=".len();
        let end = out[value_start..]
            .find(['&', ' '])
            .map_or(out.len(), |i| i + value_start);
        out.replace_range(value_start..end, "****");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/3000148"), Some(0x3000148));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(format_lsn(0x3000148), "0/3000148");
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_uri("postgres://autoctl_node:secret@localhost:5500/pg_auto_failover"),
            "postgres://autoctl_node:****@localhost:5500/pg_auto_failover"
        );
        assert_eq!(
            redact_uri("host=a password=secret user=b"),
            "host=a password=**** user=b"
        );
        assert_eq!(
            redact_uri("postgres://localhost:5500/db?password=x&sslmode=require"),
            "postgres://localhost:5500/db?password=****&sslmode=require"
        );
    }
}
