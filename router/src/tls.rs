//! TLS material: the rustls server configuration built from `[tls]` for
//! clients, and the client configuration for server connections: encryption
//! only (hapg's self-signed node certificates, as libpq's `sslmode=require`)
//! or certificates checked against `server.sslrootcert` (`verify-ca`,
//! `verify-full`).

use std::path::Path;
use std::sync::Arc;

use hapg_config::conninfo::CertCheck;
use hapg_config::router::ServerSslMode;
use rustls::pki_types::CertificateDer;

/// TLS material that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Content {
        /// The file.
        path: String,
        /// What is missing.
        what: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server configuration clients' TLS handshakes use.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Io {
            path: path.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Content {
            path: cert.display().to_string(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Content {
            path: cert.display().to_string(),
            what: "no PEM certificate found".into(),
        });
    }
    let key_der = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| TlsError::Content {
            path: key.display().to_string(),
            what: e.to_string(),
        })?
        .ok_or_else(|| TlsError::Content {
            path: key.display().to_string(),
            what: "no PEM private key found".into(),
        })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Content {
            path: cert.display().to_string(),
            what: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Content {
            path: key.display().to_string(),
            what: format!("certificate and key do not form a usable pair: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// The client configuration for TLS to servers, for `server.sslmode`:
/// encryption only (`prefer`, `require`: hapg's self-signed node
/// certificates), or the certificate checked against `server.sslrootcert`,
/// its chain (`verify-ca`) or its chain and host name (`verify-full`).
pub fn client_config(
    mode: ServerSslMode,
    root_cert: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let check = match (mode, root_cert) {
        (ServerSslMode::VerifyCa, Some(root)) => CertCheck::Chain {
            root_cert: root.to_path_buf(),
        },
        (ServerSslMode::VerifyFull, Some(root)) => CertCheck::ChainAndHost {
            root_cert: root.to_path_buf(),
        },
        _ => CertCheck::None,
    };
    let config = hapg_monitor::pgconn::client_config(&check).map_err(|e| TlsError::Content {
        path: e.path,
        what: e.reason,
    })?;
    Ok(Arc::new(config))
}
