//! `hapg demo --drill`, as the README offers it: the tutorial's cluster, a
//! switchover and a node failure under a live writer, nothing acknowledged
//! lost, and no temporary directory left behind once it stopped.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::hapg_bin;

/// The drill takes about a minute here; this bounds a hung one.
const DRILL_LIMIT: Duration = Duration::from_secs(600);

#[test]
fn demo_drill_loses_nothing_and_removes_its_directory() {
    // The demo makes its directory under TMPDIR: point that at a directory of
    // this test's, so what it leaves behind is seen and nothing else is.
    let tmp = tempfile::Builder::new()
        .prefix("hapg-test-")
        .tempdir_in("/tmp")
        .expect("temp dir");
    // Postgres runs as another OS user when the tests run as root.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod temp dir");
    let logs = tempfile::tempdir().expect("log dir");
    let stdout_path = logs.path().join("demo.out");
    let stderr_path = logs.path().join("demo.err");

    let mut child = Command::new(hapg_bin())
        .args(["demo", "--drill"])
        .env("TMPDIR", tmp.path())
        .env_remove("PGDATA")
        .env_remove("PG_AUTOCTL_MONITOR")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start hapg demo --drill");
    let deadline = Instant::now() + DRILL_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // SIGINT lets the demo stop its own processes, as Ctrl-C would.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            std::thread::sleep(Duration::from_secs(30));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let output = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let status = status.unwrap_or_else(|| panic!("the drill ran over {DRILL_LIMIT:?}\n{output}"));
    assert!(status.success(), "the drill failed ({status})\n{output}");

    assert!(stdout.contains("hapg demo in "), "{output}");
    assert!(stdout.contains("drill: perform switchover"), "{output}");
    assert!(stdout.contains("acknowledged writes lost:   0"), "{output}");
    let acked: u64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("writes acknowledged:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count of acknowledged writes\n{output}"));
    assert!(acked > 0, "the writer got nothing through\n{output}");

    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read TMPDIR")
        .map(|e| e.expect("dir entry").file_name())
        .collect();
    assert!(
        left.is_empty(),
        "the demo left {left:?} in its TMPDIR\n{output}"
    );
}

/// Runs `hapg demo` with `args` and a Postgres directory that has no
/// programs, so that it fails at its first step; returns its output.
fn failing_demo(tmp: &std::path::Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let out = Command::new(hapg_bin())
        .arg("demo")
        .args(args)
        .current_dir(tmp)
        .env("TMPDIR", tmp)
        .env("HAPG_PG_BINDIR", tmp.join("no-postgres-here"))
        .env_remove("PGDATA")
        .env_remove("PG_AUTOCTL_MONITOR")
        .stdin(Stdio::null())
        .output()
        .expect("run hapg demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[test]
fn a_failed_demo_keeps_its_directory_and_dir_is_always_kept() {
    let tmp = tempfile::Builder::new()
        .prefix("hapg-test-")
        .tempdir_in("/tmp")
        .expect("temp dir");

    // Its own temporary directory, kept after the failure and named.
    let (status, output) = failing_demo(tmp.path(), &[]);
    assert!(!status.success(), "{output}");
    let made: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read TMPDIR")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("hapg-demo-"))
        })
        .collect();
    assert_eq!(
        made.len(),
        1,
        "one demo directory, kept: {made:?}\n{output}"
    );
    assert!(
        output.contains(&format!("stay in {}", made[0].display())),
        "the kept directory is named\n{output}"
    );

    // --dir: used as given and kept.
    let (status, output) = failing_demo(tmp.path(), &["--dir", "./mine"]);
    assert!(!status.success(), "{output}");
    assert!(tmp.path().join("mine").is_dir(), "{output}");
    assert!(output.contains("mine"), "{output}");
    // A --dir that is not empty is refused before anything is made in it.
    std::fs::create_dir_all(tmp.path().join("full")).expect("mkdir");
    std::fs::write(tmp.path().join("full").join("x"), "x").expect("a file in it");
    let (status, output) = failing_demo(tmp.path(), &["--dir", "./full"]);
    assert!(!status.success(), "{output}");
    assert!(output.contains("is not empty"), "{output}");
}
