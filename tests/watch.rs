//! `hapg watch` used as a person would: in a real terminal (a detached tmux
//! session), reading the screen with capture-pane while a switchover runs, then
//! typing `q`. Also Ctrl-C, a resize, and the one-frame output of a pipe.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{hapg_bin, Cluster};

const STEP: Duration = Duration::from_secs(90);

/// Makes sure tmux is there; fails (never skips) when it is not. Tests do
/// not install packages: `.ci/install` does, before the suite runs.
fn ensure_tmux() {
    let version = Command::new("tmux").arg("-V").output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "tmux is needed to test `hapg watch` in a terminal: run .ci/install as root \
         (or apt-get install tmux); tmux -V: {version:?}"
    );
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One `hapg watch` in a detached tmux session of its own tmux server (its own
/// socket), killed on drop.
struct Watch {
    socket: String,
    session: String,
    /// Where the command writes its exit code, then `stty -a` of the pane
    /// after it exited (to see that the terminal was restored).
    rc_file: PathBuf,
    stty_file: PathBuf,
    err_file: PathBuf,
}

impl Watch {
    fn start(cluster: &Cluster, tag: &str, cols: u16, rows: u16) -> Watch {
        let dir = cluster.path();
        let unique = format!("hapg-watch-{}-{tag}", std::process::id());
        let rc_file = dir.join(format!("{tag}.rc"));
        let stty_file = dir.join(format!("{tag}.stty"));
        let err_file = dir.join(format!("{tag}.err"));
        let q = |p: &Path| shell_quote(&p.display().to_string());
        let command = format!(
            "env -u PGDATA -u PG_AUTOCTL_MONITOR -u HAPG_LOG XDG_CONFIG_HOME={} XDG_DATA_HOME={} \
             {} watch --pgdata {} 2>{}; echo $? >{}; stty -a >{} 2>&1",
            q(&dir.join("xdg/config")),
            q(&dir.join("xdg/data")),
            q(&hapg_bin()),
            q(&dir.join("monitor")),
            q(&err_file),
            q(&rc_file),
            q(&stty_file),
        );
        let watch = Watch {
            socket: unique.clone(),
            session: unique,
            rc_file,
            stty_file,
            err_file,
        };
        let cols = cols.to_string();
        let rows = rows.to_string();
        let out = watch
            .tmux(&[
                "new-session",
                "-d",
                "-s",
                &watch.session,
                "-x",
                &cols,
                "-y",
                &rows,
                "-c",
                &dir.display().to_string(),
                &command,
            ])
            .output()
            .expect("run tmux new-session");
        assert!(out.status.success(), "tmux new-session: {}", text(&out));
        watch
    }

    fn tmux(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .env("TERM", "xterm-256color")
            .stdin(Stdio::null());
        cmd
    }

    /// The pane's screen as text; empty once the session is gone.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn alive(&self) -> bool {
        self.tmux(&["has-session", "-t", &self.session])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A tmux format of the pane, such as `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        self.tmux(&["display-message", "-p", "-t", &self.session, format])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    fn keys(&self, keys: &str) {
        let out = self
            .tmux(&["send-keys", "-t", &self.session, keys])
            .output()
            .expect("run tmux send-keys");
        assert!(
            out.status.success(),
            "tmux send-keys {keys}: {}",
            text(&out)
        );
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err_file).unwrap_or_default()
    }

    /// Polls the screen every 100 ms until `check` holds; returns that screen,
    /// or panics after `timeout` with the last screen.
    fn wait_screen(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Screen) -> bool,
    ) -> Screen {
        let deadline = Instant::now() + timeout;
        let mut last = Screen::default();
        while Instant::now() < deadline {
            last = Screen::new(self.screen());
            if check(&last) {
                return last;
            }
            assert!(
                self.alive(),
                "hapg watch exited while waiting for {what}; stderr: {}\nlast screen:\n{}",
                self.stderr(),
                last.text
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "timed out after {timeout:?} waiting for {what}; stderr: {}\nlast screen:\n{}",
            self.stderr(),
            last.text
        );
    }

    /// Types `keys` and waits (bounded) for the session to end; checks the
    /// exit code and that the terminal was left in cooked mode.
    fn quit_with(&self, keys: &str) {
        self.keys(keys);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            !self.alive(),
            "hapg watch still runs 10 s after {keys}; screen:\n{}",
            self.screen()
        );
        assert!(
            self.screen().is_empty(),
            "the pane is still there after {keys}"
        );
        let rc = std::fs::read_to_string(&self.rc_file).unwrap_or_default();
        assert_eq!(
            rc.trim(),
            "0",
            "hapg watch exit code after {keys}; stderr: {}",
            self.stderr()
        );
        let stty = std::fs::read_to_string(&self.stty_file).unwrap_or_default();
        let flags: Vec<&str> = stty.split_whitespace().collect();
        assert!(
            flags.contains(&"icanon") && flags.contains(&"echo") && flags.contains(&"isig"),
            "the terminal was left in raw mode after {keys}:\n{stty}"
        );
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self
            .tmux(&["kill-server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A captured screen, with the node table's rows split in cells.
#[derive(Default, Debug)]
struct Screen {
    text: String,
}

impl Screen {
    fn new(text: String) -> Screen {
        Screen { text }
    }

    /// The cells of the node table's row of `name`: Name, Node, Host:Port,
    /// TLI: LSN, Lag, Last Report, Connection, Reported State, Assigned State.
    fn node(&self, name: &str) -> Option<Vec<String>> {
        self.text.lines().find_map(|line| {
            let cells: Vec<String> = line.split(" | ").map(|c| c.trim().to_string()).collect();
            (cells.len() == 9 && cells[0] == name).then_some(cells)
        })
    }

    /// `name` reports and is assigned `state`, and the monitor's last health
    /// check of it passed (a node is briefly unhealthy while a base backup or
    /// a demotion has its Postgres down; the ` !` goes once a check passes).
    fn is(&self, name: &str, state: &str) -> bool {
        self.node(name).is_some_and(|c| {
            c[7] == state && c[8] == state && !c[6].ends_with(" !") && !c[6].ends_with(" ?")
        })
    }

    /// The primary epoch of the header.
    fn epoch(&self) -> Option<i64> {
        let header = self.text.lines().next()?;
        let rest = header.split("primary epoch: ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    }
}

#[test]
fn watch_in_a_terminal_during_a_switchover() {
    ensure_tmux();
    let cluster = Cluster::formation(&["node_a", "node_b"], STEP);

    // Not a terminal: one plain frame, then exit 0.
    let plain = cluster.ok(&["watch", "--pgdata", "./monitor"]);
    assert!(
        plain.contains("formation: default") && plain.contains("Event Time"),
        "{plain}"
    );
    assert!(
        plain
            .lines()
            .any(|l| l.starts_with("node_a |") && l.contains("primary")),
        "{plain}"
    );
    let json = cluster.ok(&["watch", "--pgdata", "./monitor", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).expect("watch --json");
    assert_eq!(json["nodes"].as_array().map(Vec::len), Some(2), "{json}");

    // In a 160x40 terminal.
    let watch = Watch::start(&cluster, "main", 160, 40);
    let before = watch.wait_screen("node_a primary, node_b secondary", STEP, |s| {
        s.is("node_a", "primary") && s.is("node_b", "secondary")
    });
    assert_eq!(
        watch.pane("#{alternate_on}"),
        "1",
        "not on the alternate screen"
    );
    let header = before.text.lines().next().unwrap_or_default();
    assert!(
        header.contains("formation: default")
            && header.contains("monitor: ")
            && header.contains("primary epoch: "),
        "{}",
        before.text
    );
    let a = before.node("node_a").unwrap_or_default();
    let b = before.node("node_b").unwrap_or_default();
    assert_eq!(a[4], "", "no lag shown for the primary:\n{}", before.text);
    assert!(
        !b[4].is_empty() && b[4].chars().all(|c| c.is_ascii_digit()),
        "the standby's lag in bytes:\n{}",
        before.text
    );
    assert!(
        a[3].contains(": ") && a[6] == "read-write",
        "{}",
        before.text
    );
    assert_eq!(b[6], "read-only", "{}", before.text);
    assert!(
        before.text.contains("Event Time") && before.text.contains("Comment"),
        "{}",
        before.text
    );
    assert!(
        before.text.lines().all(|l| l.chars().count() <= 160),
        "{}",
        before.text
    );
    let epoch_before = before.epoch().expect("primary epoch in the header");

    // Switchover, watching the screen while it runs.
    let screens = std::thread::scope(|scope| {
        let switchover =
            scope.spawn(|| cluster.ok(&["perform", "switchover", "--pgdata", "./monitor"]));
        let mut screens: Vec<String> = Vec::new();
        let deadline = Instant::now() + STEP;
        while !switchover.is_finished() && Instant::now() < deadline {
            let screen = watch.screen();
            if screens.last() != Some(&screen) {
                screens.push(screen);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        switchover.join().expect("switchover thread");
        screens
    });
    let after = watch.wait_screen(
        "node_b primary, node_a secondary and a switchover event",
        STEP,
        |s| {
            s.is("node_b", "primary")
                && s.is("node_a", "secondary")
                && s.text.to_lowercase().contains("switchover")
        },
    );
    // The view followed the switchover: it showed states between the two
    // steady ones, not only the end.
    let transient = screens.iter().any(|s| {
        let s = Screen::new(s.clone());
        ["node_a", "node_b"].iter().any(|n| {
            s.node(n)
                .is_some_and(|c| !(c[7] == c[8] && (c[7] == "primary" || c[7] == "secondary")))
        })
    });
    assert!(
        transient,
        "no screen showed the switchover in progress; {} screens, last:\n{}",
        screens.len(),
        after.text
    );
    let epoch_after = after.epoch().expect("primary epoch in the header");
    assert!(
        epoch_after > epoch_before,
        "epoch {epoch_before} -> {epoch_after}\n{}",
        after.text
    );
    let a = after.node("node_a").unwrap_or_default();
    let b = after.node("node_b").unwrap_or_default();
    assert_eq!(b[4], "", "no lag for the new primary:\n{}", after.text);
    assert_eq!(b[6], "read-write", "{}", after.text);
    assert_eq!(a[6], "read-only", "{}", after.text);

    // A smaller terminal: the view redraws to fit.
    let out = watch
        .tmux(&[
            "resize-window",
            "-t",
            &watch.session,
            "-x",
            "90",
            "-y",
            "16",
        ])
        .output()
        .expect("tmux resize-window");
    assert!(out.status.success(), "tmux resize-window: {}", text(&out));
    let small = watch.wait_screen("the view at 90x16", Duration::from_secs(10), |s| {
        s.text.lines().count() <= 16
            && s.text.lines().all(|l| l.chars().count() <= 90)
            && s.text.lines().any(|l| l.starts_with("node_b |"))
            && s.text.contains("Event Time")
    });
    // The newest event (last line) shows the start of its comment.
    let newest = small
        .text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    let comment = newest.split(" | ").nth(4).unwrap_or_default();
    assert!(comment.len() >= 10, "{}", small.text);

    watch.quit_with("q");
    drop(watch);

    // Ctrl-C quits too.
    let watch = Watch::start(&cluster, "ctrl-c", 160, 30);
    watch.wait_screen("the node table", STEP, |s| s.is("node_b", "primary"));
    watch.quit_with("C-c");

    // Closing the terminal (its tmux server goes away, the pty hangs up)
    // ends hapg watch too, instead of leaving it reading the dead terminal.
    let watch = Watch::start(&cluster, "hangup", 160, 30);
    watch.wait_screen("the node table", STEP, |s| s.is("node_b", "primary"));
    let shell = watch.pane("#{pane_pid}");
    let children =
        std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap_or_default();
    let pid = children
        .split_whitespace()
        .next()
        .unwrap_or_else(|| {
            panic!("no child of the pane's shell {shell:?}: hapg watch is not running")
        })
        .to_string();
    let running = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat.rsplit(") ").next().map(|rest| !rest.starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(running(&pid), "hapg watch (pid {pid}) is not running");
    drop(watch);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(&pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if running(&pid) {
        let _ = Command::new("kill").args(["-9", &pid]).status();
        panic!("hapg watch (pid {pid}) still runs 10 s after its terminal was closed");
    }
}
