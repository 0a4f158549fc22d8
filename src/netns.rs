//! Addresses for network namespaces that fault tests and benchmarks make:
//! a private /24 chosen per run and checked against the host's, so that
//! leftovers of an earlier run, or another run at the same time, never share
//! a subnet with this one.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// A value that differs between runs: the process id mixed with the clock.
/// Also good for naming a run's namespaces and interfaces.
pub fn run_seed() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    std::process::id().wrapping_mul(2_654_435_761) ^ nanos
}

/// The first three octets (`10.a.b`) of a /24 in 10.100.0.0/9 (private)
/// that no IPv4 address or route of the host touches, picked from `seed`;
/// `None` when `ip` cannot be run or 64 candidates are all taken.
pub fn free_subnet(seed: u32) -> Option<String> {
    let output = |args: &[&str]| -> Option<String> {
        let out = Command::new("ip").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let used = format!(
        "{}\n{}",
        output(&["-4", "-o", "addr", "show"])?,
        output(&["-4", "route", "show", "table", "all"])?
    );
    (0..64u32)
        .map(|attempt| subnet_candidate(seed.wrapping_add(attempt.wrapping_mul(7919))))
        .find(|prefix| !used.contains(&format!("{prefix}.")))
}

/// A candidate /24 for `x`: away from the low 10.x subnets people use.
fn subnet_candidate(x: u32) -> String {
    format!("10.{}.{}", 100 + (x >> 8) % 128, x % 256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_stay_in_10_100_to_10_227() {
        for x in [0, 255, 256, 32_767, 32_768, u32::MAX] {
            let prefix = subnet_candidate(x);
            let octets: Vec<u32> = prefix
                .split('.')
                .map(|o| o.parse().unwrap_or(999))
                .collect();
            assert_eq!(octets.len(), 3, "{prefix}");
            assert_eq!(octets[0], 10);
            assert!((100..228).contains(&octets[1]), "{prefix}");
            assert!(octets[2] < 256, "{prefix}");
        }
    }
}
