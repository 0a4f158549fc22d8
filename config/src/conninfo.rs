//! Connection strings with libpq's certificate checks: `sslmode=verify-ca` and
//! `verify-full` with `sslrootcert`, which tokio-postgres does not parse (its
//! TLS connector does the checking). They are taken out here, so that the
//! rest of the string goes to tokio-postgres and the check to the connector.

use std::path::PathBuf;

/// How a client checks the certificate a server presents (libpq's `sslmode`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CertCheck {
    /// None: encryption only (`require`, `prefer`), or no TLS at all.
    #[default]
    None,
    /// `verify-ca`: the chain leads to a certificate of `root_cert`.
    Chain {
        /// PEM file of trusted CA certificates (`sslrootcert`).
        root_cert: PathBuf,
    },
    /// `verify-full`: the chain, and the host name the client connected to.
    ChainAndHost {
        /// PEM file of trusted CA certificates (`sslrootcert`).
        root_cert: PathBuf,
    },
}

impl CertCheck {
    /// The CA file, when certificates are checked.
    pub fn root_cert(&self) -> Option<&std::path::Path> {
        match self {
            CertCheck::None => None,
            CertCheck::Chain { root_cert } | CertCheck::ChainAndHost { root_cert } => {
                Some(root_cert)
            }
        }
    }
}

/// A connection string split into what tokio-postgres reads and the check.
#[derive(Debug, Clone)]
pub struct Conninfo {
    /// Everything else; `sslmode` is `require` when a certificate is checked.
    pub config: tokio_postgres::Config,
    /// The certificate check.
    pub cert_check: CertCheck,
}

/// Parses a connection string (URI or `key=value` form). `sslmode=verify-ca`
/// and `verify-full` need a CA file: `sslrootcert`, or libpq's default
/// `~/.postgresql/root.crt`. An explicit `sslrootcert` with `sslmode=require`
/// checks the chain, as libpq does when it finds a CA file.
pub fn parse(text: &str) -> Result<Conninfo, String> {
    let (rest, sslmode, root) = if let Some(after) = text
        .strip_prefix("postgres://")
        .or_else(|| text.strip_prefix("postgresql://"))
    {
        split_uri(&text[..text.len() - after.len()], after)?
    } else {
        split_keywords(text)?
    };
    let root = root.map(PathBuf::from);
    let checked = match sslmode.as_deref() {
        Some("verify-ca") => Some(false),
        Some("verify-full") => Some(true),
        Some("require") if root.is_some() => Some(false),
        _ => None,
    };
    let cert_check = match checked {
        None => CertCheck::None,
        Some(host) => {
            let root_cert = match root {
                Some(path) if path.as_os_str() == "system" => {
                    return Err(
                        "sslrootcert=system is not supported: give the CA certificate file".into(),
                    )
                }
                Some(path) => path,
                None => default_root_cert().ok_or(
                    "sslmode verify-ca and verify-full need sslrootcert (the CA certificate file)",
                )?,
            };
            if host {
                CertCheck::ChainAndHost { root_cert }
            } else {
                CertCheck::Chain { root_cert }
            }
        }
    };
    let config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| e.to_string())?;
    let mut config = config;
    if cert_check != CertCheck::None {
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
    }
    Ok(Conninfo { config, cert_check })
}

/// libpq's default CA file, `~/.postgresql/root.crt`, when it exists.
fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".postgresql/root.crt");
    path.exists().then_some(path)
}

type Split = (String, Option<String>, Option<String>);

/// `postgres://...?a=b&sslmode=verify-full&sslrootcert=/x`: the URI without
/// the two parameters (sslmode put back when tokio-postgres knows it).
fn split_uri(scheme: &str, after: &str) -> Result<Split, String> {
    let Some((base, query)) = after.split_once('?') else {
        return Ok((format!("{scheme}{after}"), None, None));
    };
    let mut kept = Vec::new();
    let mut sslmode = None;
    let mut root = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => sslmode = Some(percent_decode(value)?),
            "sslrootcert" => root = Some(percent_decode(value)?),
            _ => kept.push(pair),
        }
    }
    if let Some(mode) = sslmode.as_deref().filter(|m| !m.starts_with("verify-")) {
        kept.push(match mode {
            "disable" => "sslmode=disable",
            "prefer" => "sslmode=prefer",
            "require" => "sslmode=require",
            _ => return Err(format!("invalid value for option `sslmode`: {mode:?}")),
        });
    }
    let mut out = format!("{scheme}{base}");
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Ok((out, sslmode, root))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("invalid percent-encoding in {text:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// `host=a sslmode=verify-full sslrootcert='/x y'`: the same parsed into
/// pairs (libpq's quoting: single quotes, backslash escapes) and written back
/// without the two parameters.
fn split_keywords(text: &str) -> Result<Split, String> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "missing \"=\" after {key:?} in the connection string"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.push(chars.next().ok_or("unterminated quoted value")?),
                    Some(c) => value.push(c),
                    None => return Err("unterminated quoted value in the connection string".into()),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(
                        chars
                            .next()
                            .ok_or("a backslash ends the connection string")?,
                    );
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
    let mut sslmode = None;
    let mut root = None;
    let mut out = String::new();
    for (key, value) in pairs {
        match key.as_str() {
            "sslmode" if value.starts_with("verify-") => sslmode = Some(value),
            "sslmode" => {
                sslmode = Some(value.clone());
                push_pair(&mut out, &key, &value);
            }
            "sslrootcert" => root = Some(value),
            _ => push_pair(&mut out, &key, &value),
        }
    }
    Ok((out, sslmode, root))
}

fn push_pair(out: &mut String, key: &str, value: &str) {
    if !out.is_empty() {
        out.push(' ');
    }
    out.push_str(key);
    out.push_str("='");
    out.push_str(&value.replace('\\', "\\\\").replace('\'', "\\'"));
    out.push('\'');
}

/// `value` quoted for a libpq `key=value` connection string.
pub fn quote_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode;

    #[test]
    fn verify_modes_are_taken_out_of_uris_and_keywords() {
        for text in [
            "postgres://autoctl_node@localhost:5000/pg_auto_failover?sslmode=verify-full&sslrootcert=/etc/ssl/ca%20file.pem",
            "host=localhost port=5000 user=autoctl_node dbname=pg_auto_failover sslmode=verify-full sslrootcert='/etc/ssl/ca file.pem'",
        ] {
            let info = parse(text).expect(text);
            assert_eq!(
                info.cert_check,
                CertCheck::ChainAndHost {
                    root_cert: PathBuf::from("/etc/ssl/ca file.pem")
                },
                "{text}"
            );
            assert_eq!(info.config.get_ssl_mode(), SslMode::Require, "{text}");
            assert_eq!(info.config.get_dbname(), Some("pg_auto_failover"));
            assert_eq!(info.config.get_ports(), &[5000]);
        }
        let info =
            parse("postgres://h/db?sslmode=verify-ca&sslrootcert=/ca.pem&application_name=x")
                .expect("verify-ca");
        assert_eq!(
            info.cert_check,
            CertCheck::Chain {
                root_cert: PathBuf::from("/ca.pem")
            }
        );
        assert_eq!(info.config.get_application_name(), Some("x"));
        // libpq: require with a CA file checks the chain.
        let info = parse("host=h sslmode=require sslrootcert=/ca.pem").expect("require");
        assert!(matches!(info.cert_check, CertCheck::Chain { .. }));
    }

    #[test]
    fn other_modes_pass_through_unchecked() {
        for (text, mode) in [
            ("postgres://h/db?sslmode=require", SslMode::Require),
            ("postgres://h/db", SslMode::Prefer),
            ("host=h sslmode=disable", SslMode::Disable),
        ] {
            let info = parse(text).expect(text);
            assert_eq!(info.cert_check, CertCheck::None, "{text}");
            assert_eq!(info.config.get_ssl_mode(), mode, "{text}");
        }
        let info = parse("host=h password='a b\\'c'").expect("quoted");
        assert_eq!(info.config.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse("postgres://h/db?sslmode=maybe").is_err());
        assert!(parse("postgres://h/db?sslmode=verify-full&sslrootcert=system").is_err());
        assert!(parse("host=h sslrootcert='/unterminated").is_err());
        assert!(parse("garbage").is_err());
    }
}
