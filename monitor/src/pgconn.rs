//! Opening Postgres connections the way every hapg component does: TLS when the
//! server offers it (encryption without certificate verification, as libpq's
//! `sslmode=require`, or with the certificate checked against a CA file for
//! `verify-ca` and `verify-full`), keepalives, `TCP_USER_TIMEOUT`, a connect
//! timeout, and a task that drives the connection and forwards NOTIFY messages.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hapg_config::conninfo::CertCheck;
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

/// A CA file that cannot be used to check certificates.
#[derive(Debug, thiserror::Error)]
#[error("sslrootcert {path}: {reason}")]
pub struct RootCertError {
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The trusted roots of `path`, a PEM file of CA certificates.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, RootCertError> {
    let fail = |reason: String| RootCertError {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| fail(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| fail(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(fail("no PEM certificate found".into()));
    }
    Ok(roots)
}

/// Checks the chain against the roots and ignores only a name mismatch:
/// libpq's `verify-ca`. Everything else is webpki's.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The TLS client configuration for `check`: encryption only, the chain
/// (`verify-ca`), or the chain and the host name (`verify-full`), with
/// rustls' webpki verifier and the roots of the CA file.
pub fn client_config(check: &CertCheck) -> Result<rustls::ClientConfig, RootCertError> {
    let (root_cert, host) = match check {
        CertCheck::None => return Ok(encrypt_only_client_config()),
        CertCheck::Chain { root_cert } => (root_cert, false),
        CertCheck::ChainAndHost { root_cert } => (root_cert, true),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(load_roots(root_cert)?),
        provider.clone(),
    )
    .build()
    .map_err(|e| RootCertError {
        path: root_cert.display().to_string(),
        reason: e.to_string(),
    })?;
    let verifier: Arc<dyn ServerCertVerifier> = if host {
        verifier
    } else {
        Arc::new(ChainOnly(verifier))
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Refuses every certificate, saying why: the TLS configuration of a
/// connection string whose CA file cannot be used, for callers whose only
/// error is the connection's own.
#[derive(Debug)]
struct RefuseAll(Arc<rustls::crypto::CryptoProvider>, Arc<RootCertError>);

impl ServerCertVerifier for RefuseAll {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(self.1.clone())),
        ))
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

/// Connects to `uri` (any connection string, with libpq's `verify-ca` and
/// `verify-full`): a CA file that cannot be read fails the TLS handshake
/// with the reason, never falls back to no check.
pub async fn connect_uri(
    uri: &str,
    connect_timeout: Duration,
) -> Result<Connection, tokio_postgres::Error> {
    let parsed = match hapg_config::conninfo::parse(uri) {
        Ok(parsed) => parsed,
        // tokio-postgres' own parse error, which names the option.
        Err(_) => hapg_config::conninfo::Conninfo {
            config: uri.parse()?,
            cert_check: CertCheck::None,
        },
    };
    let tls = client_config(&parsed.cert_check).unwrap_or_else(|e| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports rustls' default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RefuseAll(provider, Arc::new(e))))
            .with_no_client_auth()
    });
    connect_with(parsed.config, MakeRustlsConnect::new(tls), connect_timeout).await
}

/// True when the connection failed because the server's certificate was
/// refused (retrying cannot help).
pub fn certificate_refused(error: &tokio_postgres::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static))
            .unwrap_or(e);
        if matches!(
            inner.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidCertificate(_))
        ) {
            return true;
        }
        source = e.source();
    }
    false
}

/// A connected client, with the NOTIFY messages its connection received.
pub struct Connection {
    /// The client.
    pub client: Client,
    /// Notifications, in arrival order; closed when the connection ends.
    pub notifications: mpsc::UnboundedReceiver<Notification>,
}

/// Connects with `config`, applying hapg's defaults for whatever it leaves
/// unset; TLS without a certificate check.
pub async fn connect(
    config: Config,
    connect_timeout: Duration,
) -> Result<Connection, tokio_postgres::Error> {
    connect_with(config, tls_connector(), connect_timeout).await
}

/// [`connect`] with the TLS connector of `tls` (see [`client_config`]).
pub async fn connect_with(
    mut config: Config,
    tls: MakeRustlsConnect,
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
    let (client, mut connection) = config.connect(tls).await?;
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
