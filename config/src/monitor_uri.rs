//! Where the monitor's state lives, read from a monitor URI: a Postgres
//! connection string (`postgres://...`, the default monitor), or an etcd
//! cluster (`etcd://host:port[,host:port...]/prefix[?options]`, the monitor
//! with no single point of failure). Every place that takes a monitor URI
//! (`--monitor`, `node.monitor`, `router.monitor`) reads it here.

use std::path::PathBuf;

use crate::{invalid, ConfigError};

/// The store a monitor URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorLocation {
    /// The monitor's Postgres database: the connection string as given.
    Postgres(String),
    /// An etcd cluster and the key prefix the formation's state lives under.
    Etcd(EtcdLocation),
}

/// An etcd cluster, from `etcd://host:port[,host:port...]/prefix[?options]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdLocation {
    /// Client URLs of the members, `http://host:port` (or `https://`).
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing slash: `/hapg/prod` for `.../hapg/prod`.
    pub prefix: String,
    /// TLS towards etcd, when asked for.
    pub tls: Option<EtcdTls>,
}

/// TLS options of an etcd URI: `cacert=FILE` (verify the members against
/// this CA; TLS is on once it is given, and it must be given for TLS: an etcd
/// cluster has its own CA, the system's roots are not used),
/// `cert=FILE&key=FILE` (a client certificate, for members that require
/// one), `tls=on|off` (optional, to say it: `off` with the others is refused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA file the members' certificates are checked against.
    pub ca: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The port etcd's clients use when a URI gives none.
pub const ETCD_DEFAULT_PORT: u16 = 2379;

/// Reads a monitor URI; `key` names the setting or flag in errors.
pub fn parse(key: &str, value: &str) -> Result<MonitorLocation, ConfigError> {
    match value.split_once("://") {
        Some(("etcd", rest)) => parse_etcd(key, rest).map(MonitorLocation::Etcd),
        _ => Ok(MonitorLocation::Postgres(value.to_string())),
    }
}

const ETCD_FORM: &str = "expected etcd://host:port[,host:port...]/prefix";

fn parse_etcd(key: &str, rest: &str) -> Result<EtcdLocation, ConfigError> {
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (rest, None),
    };
    let Some((hosts, prefix)) = rest.split_once('/') else {
        return Err(invalid(key, format!("names no key prefix; {ETCD_FORM}")));
    };
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Err(invalid(key, format!("names no key prefix; {ETCD_FORM}")));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')))
    {
        return Err(invalid(
            key,
            format!("the key prefix {prefix:?} may only contain letters, digits, '_', '-', '.' and '/', not {bad:?}"),
        ));
    }
    if prefix.split('/').any(str::is_empty) {
        return Err(invalid(
            key,
            format!("the key prefix {prefix:?} has an empty segment (\"//\")"),
        ));
    }
    let tls = match query {
        Some(query) => parse_tls(key, query)?,
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoints = Vec::new();
    for host in hosts.split(',') {
        endpoints.push(format!("{scheme}://{}", host_port(key, host)?));
    }
    Ok(EtcdLocation {
        endpoints,
        prefix: format!("/{prefix}"),
        tls,
    })
}

/// `host` or `host:port` (an IPv6 address in brackets), as `host:port`.
fn host_port(key: &str, text: &str) -> Result<String, ConfigError> {
    if text.is_empty() {
        return Err(invalid(
            key,
            format!("has an empty member address; {ETCD_FORM}"),
        ));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && (!host.contains(':') || host.ends_with(']')) => {
            let port = port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                invalid(
                    key,
                    format!("member {text:?} has a bad port {port:?}: use 1 to 65535"),
                )
            })?;
            (host, port)
        }
        _ => (text, ETCD_DEFAULT_PORT),
    };
    if host.contains(['@', '/', ' ']) {
        return Err(invalid(key, format!("member {text:?} is not host:port")));
    }
    Ok(format!("{host}:{port}"))
}

fn parse_tls(key: &str, query: &str) -> Result<Option<EtcdTls>, ConfigError> {
    let mut on = None;
    let mut tls = EtcdTls::default();
    let (mut cert, mut client_key) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(invalid(
                key,
                format!("option {pair:?} has no value (name=value)"),
            ));
        };
        match name {
            "tls" => {
                on = match value {
                    "on" | "true" | "1" => Some(true),
                    "off" | "false" | "0" => Some(false),
                    _ => return Err(invalid(key, format!("tls={value:?}: use on or off"))),
                }
            }
            "cacert" => tls.ca = Some(PathBuf::from(value)),
            "cert" => cert = Some(PathBuf::from(value)),
            "key" => client_key = Some(PathBuf::from(value)),
            _ => {
                return Err(invalid(
                    key,
                    format!("unknown option {name:?}: an etcd URI takes tls, cacert, cert and key"),
                ))
            }
        }
    }
    tls.identity = match (cert, client_key) {
        (Some(cert), Some(client_key)) => Some((cert, client_key)),
        (None, None) => None,
        _ => {
            return Err(invalid(
                key,
                "cert and key go together: give both or neither",
            ))
        }
    };
    let files = tls.ca.is_some() || tls.identity.is_some();
    match on {
        Some(false) if files => Err(invalid(
            key,
            "tls=off with cacert, cert or key: drop tls=off to use TLS, or the files",
        )),
        Some(false) => Ok(None),
        _ if tls.ca.is_none() && (on == Some(true) || files) => Err(invalid(
            key,
            "TLS to etcd needs cacert=FILE, the CA that signed the members' certificates",
        )),
        _ => Ok(files.then_some(tls)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(uri: &str) -> EtcdLocation {
        match parse("k", uri) {
            Ok(MonitorLocation::Etcd(e)) => e,
            other => panic!("{uri}: {other:?}"),
        }
    }

    fn error(uri: &str) -> String {
        match parse("router.monitor", uri) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("{uri} accepted: {other:?}"),
        }
    }

    #[test]
    fn postgres_uris_are_kept_as_given() {
        let uri = "postgres://autoctl_node@localhost:5000/pg_auto_failover?sslmode=require";
        assert_eq!(
            parse("k", uri).expect("parse"),
            MonitorLocation::Postgres(uri.to_string())
        );
    }

    #[test]
    fn etcd_uris_give_members_prefix_and_tls() {
        let e = etcd("etcd://127.0.0.1:2379,10.0.0.2:23790,[::1]:2381,db3/hapg/prod/");
        assert_eq!(
            e.endpoints,
            [
                "http://127.0.0.1:2379",
                "http://10.0.0.2:23790",
                "http://[::1]:2381",
                "http://db3:2379"
            ]
        );
        assert_eq!(e.prefix, "/hapg/prod");
        assert_eq!(e.tls, None);

        let e = etcd("etcd://h:1/p?cacert=/ca.pem&cert=/c.pem&key=/k.pem");
        assert_eq!(e.endpoints, ["https://h:1"]);
        let tls = e.tls.expect("tls");
        assert_eq!(tls.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(
            tls.identity,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let e = etcd("etcd://h/p?tls=on&cacert=/ca.pem");
        assert_eq!(e.tls.expect("tls").ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(etcd("etcd://h/p?tls=off").tls, None);
    }

    #[test]
    fn bad_etcd_uris_name_the_key_and_the_problem() {
        for (uri, says) in [
            ("etcd://h:2379", "no key prefix"),
            ("etcd://h:2379/", "no key prefix"),
            ("etcd://h:0/p", "bad port"),
            ("etcd://h:99999/p", "bad port"),
            ("etcd://h:x/p", "bad port"),
            ("etcd://,h/p", "empty member"),
            ("etcd://u@h/p", "not host:port"),
            ("etcd://h/p q", "may only contain"),
            ("etcd://h/a//b", "empty segment"),
            ("etcd://h/p?tls=maybe", "use on or off"),
            ("etcd://h/p?sslmode=require", "unknown option \"sslmode\""),
            ("etcd://h/p?cert=/c.pem", "give both or neither"),
            ("etcd://h/p?cacert=/ca&key=/k.pem", "give both or neither"),
            ("etcd://h/p?tls=on", "needs cacert=FILE"),
            ("etcd://h/p?cert=/c.pem&key=/k.pem", "needs cacert=FILE"),
            ("etcd://h/p?tls=off&cacert=/ca.pem", "tls=off with cacert"),
            ("etcd://h/p?tls", "no value"),
        ] {
            let message = error(uri);
            assert!(message.starts_with("router.monitor: "), "{uri}: {message}");
            assert!(message.contains(says), "{uri}: {message}");
        }
    }
}
