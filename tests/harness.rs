//! The test harness's own promises: a command that hangs is killed after its
//! timeout and fails its test instead of holding CI, and a command that ends
//! in time gives its whole output.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_hung_command_is_killed_at_its_timeout() {
    let started = Instant::now();
    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let err = support::output_within(sleep, Duration::from_millis(300))
        .expect_err("sleep 30 cannot end within 300 ms");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the command was not killed: {:?}",
        started.elapsed()
    );

    let mut echo = Command::new("sh");
    echo.args(["-c", "echo out; echo err >&2; exit 3"]);
    let out = support::output_within(echo, Duration::from_secs(60)).expect("sh ends");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
}
