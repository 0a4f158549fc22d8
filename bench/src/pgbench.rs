//! pgbench: the three tests, their command lines, and reading the summary
//! pgbench prints.

use std::fmt;

use anyhow::{bail, Result};

/// One pgbench workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// `-S`: one indexed SELECT per transaction, clients stay connected.
    SelectOnly,
    /// `-S -C`: the same, with a new connection per transaction.
    SelectOnlyConnect,
    /// The default TPC-B-like script (3 UPDATEs, a SELECT, an INSERT).
    TpcB,
}

impl Test {
    /// Every test, in the order they run for each target.
    pub const ALL: [Test; 3] = [Test::SelectOnly, Test::SelectOnlyConnect, Test::TpcB];

    /// The name used on the command line (`--tests`).
    pub fn key(self) -> &'static str {
        match self {
            Test::SelectOnly => "select",
            Test::SelectOnlyConnect => "connect",
            Test::TpcB => "tpcb",
        }
    }

    /// Parses a `--tests` entry.
    pub fn from_key(key: &str) -> Result<Test> {
        match Test::ALL.into_iter().find(|t| t.key() == key) {
            Some(t) => Ok(t),
            None => bail!("unknown test {key:?}: use select, connect or tpcb"),
        }
    }

    /// pgbench options selecting this workload.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Test::SelectOnly => &["-S"],
            Test::SelectOnlyConnect => &["-S", "-C"],
            Test::TpcB => &[],
        }
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Test::SelectOnly => "select-only",
            Test::SelectOnlyConnect => "select-only -C",
            Test::TpcB => "TPC-B",
        })
    }
}

/// How one run is shaped (the same for every target).
#[derive(Debug, Clone)]
pub struct Shape {
    pub clients: u32,
    pub threads: u32,
    pub duration_s: u64,
    /// `-M`: simple, extended or prepared.
    pub query_mode: String,
}

/// pgbench arguments for `test` against `port` (host, user and database
/// are the same for every target).
pub fn args(test: Test, shape: &Shape, port: u16, dbname: &str) -> Vec<String> {
    let mut a: Vec<String> = vec!["-n".into()];
    a.extend(test.flags().iter().map(|s| s.to_string()));
    a.extend([
        "-M".into(),
        shape.query_mode.clone(),
        "-c".into(),
        shape.clients.to_string(),
        "-j".into(),
        shape.threads.min(shape.clients).to_string(),
        "-T".into(),
        shape.duration_s.to_string(),
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
        "-U".into(),
        "postgres".into(),
        dbname.into(),
    ]);
    a
}

/// The numbers of one pgbench run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Transactions per second (pgbench's `tps =` line).
    pub tps: f64,
    /// `latency average`, in milliseconds.
    pub latency_ms: f64,
    /// `average connection time` (pgbench 14+ with `-C`), in milliseconds.
    pub connect_ms: Option<f64>,
    /// `number of transactions actually processed`.
    pub transactions: u64,
    /// `number of failed transactions` (pgbench 15+), 0 when absent.
    pub failed: u64,
}

/// Reads pgbench's summary. Accepts pgbench 13 to 17 wording.
pub fn parse(output: &str) -> Result<Measured> {
    let mut tps = None;
    let mut latency = None;
    let mut connect = None;
    let mut transactions = None;
    let mut failed = 0;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("tps = ") {
            // pgbench 13 prints two tps lines; the first includes connection time.
            if tps.is_none() {
                tps = first_number(rest);
            }
        } else if let Some(rest) = line.strip_prefix("latency average = ") {
            latency = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("average connection time = ") {
            connect = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("number of transactions actually processed: ")
        {
            transactions = first_number(rest).map(|n| n as u64);
        } else if let Some(rest) = line.strip_prefix("number of failed transactions: ") {
            failed = first_number(rest).map_or(0, |n| n as u64);
        }
    }
    match (tps, latency, transactions) {
        (Some(tps), Some(latency_ms), Some(transactions)) => Ok(Measured {
            tps,
            latency_ms,
            connect_ms: connect,
            transactions,
            failed,
        }),
        _ => bail!("no pgbench summary (tps, latency average, transactions) in its output"),
    }
}

/// The number at the start of `s` (`12.5 ms`, `120 (0.000%)`, `9876.5 (without ...)`).
fn first_number(s: &str) -> Option<f64> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    s[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG15_SELECT: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 10
query mode: simple
number of clients: 16
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 412345
number of failed transactions: 0 (0.000%)
latency average = 0.388 ms
initial connection time = 21.480 ms
tps = 41234.567890 (without initial connection time)
";

    const PG15_CONNECT: &str = "transaction type: <builtin: select only>
number of transactions actually processed: 8123
number of failed transactions: 3 (0.037%)
latency average = 19.694 ms
average connection time = 1.812 ms
tps = 812.412000 (including reconnection times)
";

    const PG13: &str = "number of transactions actually processed: 1000
latency average = 2.000 ms
tps = 7990.1 (including connections establishing)
tps = 8010.2 (excluding connections establishing)
";

    #[test]
    fn reads_pgbench_15() {
        let m = parse(PG15_SELECT).expect("parse");
        assert_eq!(m.tps, 41234.56789);
        assert_eq!(m.latency_ms, 0.388);
        assert_eq!(m.transactions, 412345);
        assert_eq!((m.failed, m.connect_ms), (0, None));
        let c = parse(PG15_CONNECT).expect("parse");
        assert_eq!((c.tps, c.connect_ms, c.failed), (812.412, Some(1.812), 3));
    }

    #[test]
    fn reads_pgbench_13_first_tps() {
        assert_eq!(parse(PG13).expect("parse").tps, 7990.1);
    }

    #[test]
    fn no_summary_is_an_error() {
        assert!(parse("pgbench: error: connection to server failed\n").is_err());
    }

    #[test]
    fn arguments() {
        let shape = Shape {
            clients: 1,
            threads: 2,
            duration_s: 5,
            query_mode: "simple".into(),
        };
        let a = args(Test::SelectOnlyConnect, &shape, 5433, "bench").join(" ");
        assert_eq!(
            a,
            "-n -S -C -M simple -c 1 -j 1 -T 5 -h 127.0.0.1 -p 5433 -U postgres bench"
        );
    }
}
