//! `hapg watch`: a live view of the formation, like top.
//!
//! The screen shows a header (formation, primary epoch, monitor, time), the
//! nodes with their states, health, timeline/LSN, lag behind the primary and
//! the age of their last report, then the latest events, newest last. A task
//! owns the monitor connection: it LISTENs on `hapg_state` and fetches a new
//! snapshot on every notification, at least every second, and when the
//! terminal is resized. The screen is redrawn on every snapshot and every
//! second. `q`, `Q`, Esc or Ctrl-C (and SIGINT, SIGTERM, SIGHUP) quit; the
//! terminal is restored on every way out, panics included.
//!
//! When stdout is not a terminal, one frame is printed as plain text (or JSON
//! with `--json`) and the command exits.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::style::{Attribute, Print, SetAttribute};
use crossterm::terminal::{self, ClearType};
use crossterm::{cursor, execute, queue};
use hapg_monitor::client::{EventRow, NodeRow};
use hapg_monitor::pgconn::{format_lsn, redact_uri};
use hapg_monitor::MonitorClient;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

use crate::show;

/// How often the view refreshes without a notification.
const TICK: Duration = Duration::from_secs(1);
/// Events shown by the one-frame (non-terminal) output.
const PLAIN_EVENTS: i64 = 10;
/// Most events fetched for the screen, whatever its height.
const MAX_EVENTS: usize = 500;

/// What the monitor said at one moment.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// The monitor's clock when the snapshot was taken (`YYYY-MM-DD HH:MM:SS`).
    time: String,
    /// The formation's primary epoch.
    epoch: Option<i64>,
    /// The node writable in that epoch.
    primary_node_id: Option<i64>,
    nodes: Vec<NodeRow>,
    /// Latest events, newest last.
    events: Vec<EventRow>,
    /// Why the last refresh failed (the data above is then older).
    error: Option<String>,
    /// When the data above was fetched.
    fetched: Option<Instant>,
}

/// Runs `hapg watch` against `conninfo`, for `formation`.
pub async fn run(conninfo: &str, formation: &str, json: bool) -> Result<()> {
    let monitor = MonitorClient::connect_with_retry(conninfo, Duration::from_secs(5)).await?;
    monitor.formation(formation).await?;
    if json || !std::io::stdout().is_terminal() {
        let snap = fetch(&monitor, formation, PLAIN_EVENTS).await?;
        let mut out = std::io::stdout().lock();
        if json {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&frame_json(formation, &snap))?
            )?;
        } else {
            for line in frame(&snap, formation, monitor.uri(), None) {
                writeln!(out, "{}", line.trim_end())?;
            }
        }
        return Ok(());
    }
    monitor.listen_state().await?;
    let (_, rows) = screen_size();
    let count = i64::try_from(events_room(0, rows)).unwrap_or(1);
    let first = fetch(&monitor, formation, count).await?;
    let uri = monitor.uri().to_string();
    live(
        monitor,
        first,
        conninfo.to_string(),
        formation.to_string(),
        uri,
    )
    .await
}

/// One snapshot: three queries on the same connection.
async fn fetch(monitor: &MonitorClient, formation: &str, events: i64) -> Result<Snapshot> {
    let time = monitor.clock().await?;
    let f = monitor.formation(formation).await?;
    let nodes = monitor.nodes(formation, None).await?;
    let events = monitor.events(formation, events).await?;
    Ok(Snapshot {
        time,
        epoch: Some(f.primary_epoch),
        primary_node_id: f.primary_node_id,
        nodes,
        events,
        error: None,
        fetched: Some(Instant::now()),
    })
}

/// The node the others' lag is measured against, in `node`'s group: the
/// formation's writable node when it is in that group, else the group's node
/// that reports a writable state (the most advanced one if several do).
fn primary_of<'a>(snap: &'a Snapshot, node: &NodeRow) -> Option<&'a NodeRow> {
    let group = snap.nodes.iter().filter(|n| n.group_id == node.group_id);
    if let Some(p) = snap
        .primary_node_id
        .and_then(|id| snap.nodes.iter().find(|n| n.node_id == id))
        .filter(|p| p.group_id == node.group_id)
    {
        return Some(p);
    }
    group
        .filter(|n| n.reported.can_take_writes())
        .max_by_key(|n| (n.tli, n.lsn))
}

/// Bytes `node` is behind its primary; blank for the primary itself (and
/// when there is none), 0 when its report is ahead of the primary's.
fn lag(snap: &Snapshot, node: &NodeRow) -> String {
    match primary_of(snap, node) {
        Some(p) if p.node_id != node.node_id => p.lsn.saturating_sub(node.lsn).to_string(),
        _ => String::new(),
    }
}

/// `0.4s`, `12s`, `3m07s`, `2h05m`; `-` when the node never reported.
fn age(age: Option<Duration>) -> String {
    let Some(age) = age else {
        return "-".into();
    };
    let secs = age.as_secs();
    if secs < 10 {
        format!("{:.1}s", age.as_secs_f64())
    } else if secs < 120 {
        format!("{secs}s")
    } else if secs < 7200 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// The node table.
fn nodes_table(snap: &Snapshot) -> String {
    let rows: Vec<Vec<String>> = snap
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.node_id.to_string(),
                n.address(),
                format!("{:>3}: {}", n.tli, format_lsn(n.lsn)),
                lag(snap, n),
                age(n.report_age),
                show::connection_in(&snap.nodes, n),
                n.reported.to_string(),
                n.goal.to_string(),
            ]
        })
        .collect();
    show::table(
        &[
            "Name",
            "Node",
            "Host:Port",
            "TLI: LSN",
            "Lag (bytes)",
            "Last Report",
            "Connection",
            "Reported State",
            "Assigned State",
        ],
        &rows,
        &[4, 5, 10, 9, 11, 11, 12, 19, 19],
    )
}

/// The events, newest last, narrower than `show events` so that the comment
/// starts early enough to be read on an ordinary terminal: time of day to the
/// millisecond, node name, states.
fn events_table(events: &[EventRow]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            // `YYYY-MM-DD HH:MM:SS.ffffff` -> `HH:MM:SS.fff`.
            let time = e.event_time.get(11..23).unwrap_or(&e.event_time);
            let node = match (&e.node_name, e.group_id, e.node_id) {
                (Some(name), _, _) => name.clone(),
                (None, Some(g), Some(n)) => format!("{g}/{n}"),
                _ => String::new(),
            };
            vec![
                time.to_string(),
                node,
                e.reported_state.clone().unwrap_or_default(),
                e.goal_state.clone().unwrap_or_default(),
                e.description.clone(),
            ]
        })
        .collect();
    show::table_last_left(
        &["Event Time", "Node", "Reported", "Assigned", "Comment"],
        &rows,
        &[12, 4, 8, 8],
    )
}

/// The header line.
fn header(snap: &Snapshot, formation: &str, uri: &str) -> String {
    let epoch = snap
        .epoch
        .map_or_else(|| "?".to_string(), |e| e.to_string());
    let time = if snap.time.is_empty() {
        "--".to_string()
    } else {
        snap.time.clone()
    };
    format!(
        "hapg watch   {time}   formation: {formation}   primary epoch: {epoch}   monitor: {}",
        redact_uri(uri)
    )
}

/// The lines of one frame. With `size` (columns, rows) the events fill the
/// rows left under the node table and every line is cut to the width;
/// without it every line and every event of the snapshot is kept.
fn frame(snap: &Snapshot, formation: &str, uri: &str, size: Option<(usize, usize)>) -> Vec<String> {
    let mut lines = vec![header(snap, formation, uri)];
    match &snap.error {
        Some(e) => {
            let since = snap
                .fetched
                .map(|t| format!(" (data below from {}s ago)", t.elapsed().as_secs()))
                .unwrap_or_default();
            lines.push(format!("STALE{since}: monitor {e}"));
        }
        None => lines.push(String::new()),
    }
    lines.extend(nodes_table(snap).lines().map(str::to_string));
    if snap.nodes.is_empty() {
        lines.push("(no nodes in this formation)".into());
    }
    lines.push(String::new());
    let events = events_table(&snap.events);
    let mut event_lines: Vec<String> = events.lines().map(str::to_string).collect();
    if let Some((_, rows)) = size {
        // Header and dash line of the events table always show; then the
        // newest events that fit.
        let room = rows.saturating_sub(lines.len());
        if event_lines.len() > room {
            let keep = room.saturating_sub(2);
            let newest = event_lines.split_off(event_lines.len() - keep);
            event_lines.truncate(2.min(room));
            event_lines.extend(newest);
        }
    }
    lines.extend(event_lines);
    if let Some((cols, rows)) = size {
        lines.truncate(rows);
        for line in &mut lines {
            if line.chars().count() > cols {
                *line = line.chars().take(cols).collect();
            }
        }
    }
    lines
}

/// How many events fit under the node table on a screen `rows` high.
fn events_room(nodes: usize, rows: usize) -> usize {
    // header, status line, table header + dashes, nodes, blank, events header + dashes.
    let used = 2 + 2 + nodes.max(1) + 1 + 2;
    rows.saturating_sub(used).clamp(1, MAX_EVENTS)
}

/// `--json`: the snapshot as one object.
fn frame_json(formation: &str, snap: &Snapshot) -> serde_json::Value {
    let mut nodes = show::state_json(&snap.nodes);
    if let Some(array) = nodes.as_array_mut() {
        for (value, node) in array.iter_mut().zip(&snap.nodes) {
            let lag = lag(snap, node);
            value["lag_bytes"] = lag
                .parse::<u64>()
                .map_or(serde_json::Value::Null, serde_json::Value::from);
            value["report_age_ms"] = node
                .report_age
                .map_or(serde_json::Value::Null, |a| (a.as_millis() as u64).into());
        }
    }
    serde_json::json!({
        "formation": formation,
        "time": snap.time,
        "primary_epoch": snap.epoch,
        "primary_node_id": snap.primary_node_id,
        "nodes": nodes,
        "events": show::events_json(&snap.events),
    })
}

// ---------------------------------------------------------------------------
// The terminal.

/// Whether the terminal is in the watch's mode (raw, alternate screen, no cursor).
static TERMINAL_TAKEN: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back; does nothing when it already is.
fn restore_terminal() {
    if TERMINAL_TAKEN.swap(false, Ordering::SeqCst) {
        let mut out = std::io::stdout();
        let _ = execute!(
            out,
            SetAttribute(Attribute::Reset),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
        let _ = out.flush();
    }
}

/// Holds the terminal in the watch's mode; restores it when dropped, whatever
/// the way out (return, error, panic unwinding). A panic hook restores it too,
/// before the panic message is printed, so that the message stays readable.
struct TerminalGuard;

impl TerminalGuard {
    fn take() -> Result<TerminalGuard> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        // The guard exists before the first change, so that a failure half
        // way still restores what was changed.
        TERMINAL_TAKEN.store(true, Ordering::SeqCst);
        let guard = TerminalGuard;
        terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide,
            terminal::Clear(ClearType::All)
        )
        .context("switching to the alternate screen")?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// What the terminal said.
#[derive(Debug)]
enum Input {
    Key(KeyEvent),
    Resize(u16, u16),
    Failed(String),
}

/// Whether the key quits: q, Q, Esc, Ctrl-C.
fn quits(key: &KeyEvent) -> bool {
    match key.code {
        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => true,
        KeyCode::Char('c') | KeyCode::Char('C') => key.modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

/// Reads terminal events on a thread of its own (crossterm's reader blocks),
/// sending them to `tx` until `stop` is set or the receiver is gone. It waits
/// at most [`INPUT_WAIT`] at a time, so stopping it takes at most that long.
///
/// When stdin is the terminal, the thread waits on it itself and hands it to
/// crossterm only when there is something to read: crossterm 0.28 reads a
/// closed terminal (end of file) again and again without returning, which
/// would keep a core busy after the terminal window is closed. A hung-up
/// terminal ends the reader with [`Input::Failed`] instead.
fn spawn_input_reader(
    tx: mpsc::UnboundedSender<Input>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let guard_stdin = std::io::stdin().is_terminal();
    std::thread::Builder::new()
        .name("hapg-watch-input".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                // Events crossterm already holds first (several keys can come
                // in one read), then a wait on the terminal.
                let wait = match event::poll(Duration::ZERO) {
                    Ok(true) => Duration::ZERO,
                    Ok(false) if guard_stdin => match wait_for_stdin(INPUT_WAIT) {
                        Ok(true) => Duration::ZERO,
                        Ok(false) => continue,
                        Err(e) => {
                            let _ = tx.send(Input::Failed(e));
                            return;
                        }
                    },
                    Ok(false) => INPUT_WAIT,
                    Err(e) => {
                        let _ = tx.send(Input::Failed(e.to_string()));
                        return;
                    }
                };
                let input = match event::poll(wait) {
                    Ok(false) => continue,
                    Ok(true) => match event::read() {
                        Ok(Event::Key(key)) if key.kind != KeyEventKind::Release => Input::Key(key),
                        Ok(Event::Resize(cols, rows)) => Input::Resize(cols, rows),
                        Ok(_) => continue,
                        Err(e) => Input::Failed(e.to_string()),
                    },
                    Err(e) => Input::Failed(e.to_string()),
                };
                let failed = matches!(input, Input::Failed(_));
                if tx.send(input).is_err() || failed {
                    return;
                }
            }
        })
}

/// How long the input reader waits before it looks at its stop flag again.
const INPUT_WAIT: Duration = Duration::from_millis(200);

/// Waits up to `timeout` for stdin (a terminal) to have input: true when it
/// has, false on timeout, an error when the terminal was closed.
fn wait_for_stdin(timeout: Duration) -> std::result::Result<bool, String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;

    let stdin = std::io::stdin();
    let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(0) => Ok(false),
        Ok(_) => {
            let revents = fds[0].revents().unwrap_or(PollFlags::empty());
            if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                Err("the terminal was closed".into())
            } else {
                Ok(true)
            }
        }
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(format!("waiting for the terminal: {e}")),
    }
}

/// Waits for the input reader to end, at most a few of its waits: a reader
/// stuck in a read of a terminal that went away must not keep hapg running.
fn join_input_reader(reader: std::thread::JoinHandle<()>) -> Result<()> {
    let deadline = Instant::now() + INPUT_WAIT * 5;
    while !reader.is_finished() {
        if Instant::now() >= deadline {
            // Left behind; it ends with the process.
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    reader
        .join()
        .map_err(|_| anyhow!("the terminal reader panicked"))
}

/// Draws `lines` over the whole screen, header in reverse video.
fn draw(out: &mut impl Write, lines: &[String], cols: usize, rows: usize) -> Result<()> {
    queue!(out, terminal::BeginSynchronizedUpdate)?;
    for (i, line) in lines.iter().enumerate().take(rows) {
        let y = u16::try_from(i).unwrap_or(u16::MAX);
        queue!(out, cursor::MoveTo(0, y))?;
        if i == 0 {
            let padded = format!("{line:<cols$}");
            queue!(
                out,
                SetAttribute(Attribute::Reverse),
                Print(padded),
                SetAttribute(Attribute::Reset)
            )?;
        } else {
            queue!(out, Print(line), terminal::Clear(ClearType::UntilNewLine))?;
        }
    }
    if lines.len() < rows {
        let y = u16::try_from(lines.len()).unwrap_or(u16::MAX);
        queue!(
            out,
            cursor::MoveTo(0, y),
            terminal::Clear(ClearType::FromCursorDown)
        )?;
    }
    queue!(out, terminal::EndSynchronizedUpdate)?;
    out.flush()?;
    Ok(())
}

/// The terminal's size as (columns, rows), at least 1x1.
fn screen_size() -> (usize, usize) {
    let (cols, rows) = terminal::size().unwrap_or((80, 24));
    (usize::from(cols.max(1)), usize::from(rows.max(1)))
}

/// The full-screen view until a quit key or signal.
async fn live(
    monitor: MonitorClient,
    first: Snapshot,
    conninfo: String,
    formation: String,
    uri: String,
) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let (mut cols, mut rows) = screen_size();
    let room = Arc::new(AtomicUsize::new(events_room(first.nodes.len(), rows)));
    let kick = Arc::new(Notify::new());
    let (snap_tx, mut snap_rx) = watch::channel(first);
    let poller = tokio::spawn(poll_monitor(
        monitor,
        conninfo,
        formation.clone(),
        room.clone(),
        kick.clone(),
        snap_tx,
    ));
    let _poller_guard = AbortOnDrop(poller);

    let guard = TerminalGuard::take()?;
    let (input_tx, mut inputs) = mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_input_reader(input_tx, stop.clone()).context("starting the key reader")?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = std::io::stdout();

    let outcome: Result<()> = loop {
        let lines = {
            let snap = snap_rx.borrow_and_update();
            room.store(events_room(snap.nodes.len(), rows), Ordering::SeqCst);
            frame(&snap, &formation, &uri, Some((cols, rows)))
        };
        if let Err(e) = draw(&mut out, &lines, cols, rows) {
            break Err(e);
        }
        tokio::select! {
            input = inputs.recv() => match input {
                Some(Input::Key(key)) if quits(&key) => break Ok(()),
                Some(Input::Key(_)) => {}
                Some(Input::Resize(c, r)) => {
                    cols = usize::from(c.max(1));
                    rows = usize::from(r.max(1));
                    // Clear what the old size left behind, and fetch as many
                    // events as now fit.
                    let _ = execute!(out, terminal::Clear(ClearType::All));
                    kick.notify_one();
                }
                Some(Input::Failed(e)) => break Err(anyhow!("reading the terminal: {e}")),
                None => break Err(anyhow!("the terminal reader stopped")),
            },
            changed = snap_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow!("the monitor poller stopped"));
                }
            }
            _ = tick.tick() => {}
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
            _ = sighup.recv() => break Ok(()),
        }
    };

    stop.store(true, Ordering::SeqCst);
    drop(inputs);
    drop(guard);
    join_input_reader(reader)?;
    outcome
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Owns the monitor connection: publishes a snapshot after every `hapg_state`
/// notification (a burst counts once), every [`TICK`], and on `kick`;
/// reconnects when the connection is lost, publishing the error meanwhile.
async fn poll_monitor(
    monitor: MonitorClient,
    conninfo: String,
    formation: String,
    room: Arc<AtomicUsize>,
    kick: Arc<Notify>,
    tx: watch::Sender<Snapshot>,
) {
    let mut client = Some(monitor);
    loop {
        if client.as_ref().is_none_or(MonitorClient::is_closed) {
            client = None;
            match MonitorClient::connect(&conninfo).await {
                Ok(c) => match c.listen_state().await {
                    Ok(()) => client = Some(c),
                    Err(e) => set_error(&tx, format!("cannot LISTEN: {e}")),
                },
                Err(e) => set_error(&tx, format!("unreachable: {e}")),
            }
        }
        if let Some(c) = &client {
            let count = i64::try_from(room.load(Ordering::SeqCst)).unwrap_or(1);
            match fetch(c, &formation, count).await {
                Ok(snap) => {
                    if tx.send(snap).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    set_error(&tx, format!("{e:#}"));
                    if c.is_closed() {
                        client = None;
                    }
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        if !wait_for_change(&mut client, &kick).await {
            client = None;
        }
    }
}

/// Waits for a `hapg_state` notification, [`TICK`], or `kick`; false when
/// the connection's notification stream ended (the connection is lost).
async fn wait_for_change(client: &mut Option<MonitorClient>, kick: &Notify) -> bool {
    let Some(c) = client else {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = kick.notified() => {}
        }
        return true;
    };
    let started = Instant::now();
    let notified = tokio::select! {
        n = c.next_change(TICK) => n.is_some(),
        _ = kick.notified() => return true,
    };
    if notified {
        // Several nodes change state together: one refresh for the burst.
        tokio::time::sleep(Duration::from_millis(30)).await;
        while c.try_change().is_some() {}
        true
    } else {
        // A timeout takes TICK; an earlier None means the stream ended.
        started.elapsed() >= TICK / 2
    }
}

fn set_error(tx: &watch::Sender<Snapshot>, error: String) {
    tx.send_modify(|s| s.error = Some(error));
}

#[cfg(test)]
mod tests {
    use super::*;
    use hapg_monitor::{Health, NodeState};

    fn node(name: &str, id: i64, state: NodeState, lsn: u64) -> NodeRow {
        NodeRow {
            node_id: id,
            formation: "default".into(),
            group_id: 0,
            name: name.into(),
            host: "localhost".into(),
            port: 5500 + id as u16,
            goal: state,
            reported: state,
            pg_running: true,
            rep_state: String::new(),
            tli: 1,
            lsn,
            upstream_streaming: false,
            in_recovery: None,
            upstream_silence: None,
            report_age: Some(Duration::from_millis(400)),
            health: Health::Good,
            candidate_priority: 50,
            replication_quorum: true,
        }
    }

    fn event(id: i64, text: &str) -> EventRow {
        EventRow {
            event_id: id,
            event_time: "2024-01-01 00:00:00.000000".into(),
            formation: "default".into(),
            group_id: Some(0),
            node_id: Some(1),
            node_name: Some("node_a".into()),
            reported_state: Some("primary".into()),
            goal_state: Some("primary".into()),
            primary_epoch: Some(1),
            description: text.into(),
        }
    }

    fn snapshot(events: usize) -> Snapshot {
        Snapshot {
            time: "2024-01-01 00:00:01".into(),
            epoch: Some(2),
            primary_node_id: Some(1),
            nodes: vec![
                node("node_a", 1, NodeState::Primary, 0x3000148),
                node("node_b", 2, NodeState::Secondary, 0x3000100),
            ],
            events: (0..events)
                .map(|i| event(i as i64, &format!("event number {i}")))
                .collect(),
            error: None,
            fetched: None,
        }
    }

    #[test]
    fn lag_is_blank_for_the_primary_and_bytes_for_standbys() {
        let snap = snapshot(0);
        assert_eq!(lag(&snap, &snap.nodes[0]), "");
        assert_eq!(lag(&snap, &snap.nodes[1]), "72");
        let mut ahead = snap.clone();
        ahead.nodes[1].lsn = 0x4000000;
        assert_eq!(lag(&ahead, &ahead.nodes[1]), "0");
        // Without the formation's primary: the writable node.
        let mut unknown = snap.clone();
        unknown.primary_node_id = None;
        assert_eq!(lag(&unknown, &unknown.nodes[1]), "72");
    }

    #[test]
    fn ages_read_like_top() {
        assert_eq!(age(None), "-");
        assert_eq!(age(Some(Duration::from_millis(400))), "0.4s");
        assert_eq!(age(Some(Duration::from_secs(42))), "42s");
        assert_eq!(age(Some(Duration::from_secs(187))), "3m07s");
        assert_eq!(age(Some(Duration::from_secs(7500))), "2h05m");
    }

    #[test]
    fn the_frame_fits_the_screen_with_the_newest_events() {
        let snap = snapshot(40);
        let uri = "postgres://autoctl_node:secret@localhost:5500/pg_auto_failover";
        let lines = frame(&snap, "default", uri, Some((60, 15)));
        assert_eq!(lines.len(), 15);
        assert!(lines.iter().all(|l| l.chars().count() <= 60), "{lines:#?}");
        assert!(lines[0].starts_with("hapg watch"), "{}", lines[0]);
        let wide = frame(&snap, "default", uri, Some((400, 15)));
        assert!(wide[0].contains("formation: default"), "{}", wide[0]);
        assert!(wide[0].contains("primary epoch: 2"), "{}", wide[0]);
        assert!(wide[0].contains("2024-01-01 00:00:01"), "{}", wide[0]);
        assert!(!wide[0].contains("secret"), "{}", wide[0]);
        assert!(wide[0].contains("autoctl_node:****@"), "{}", wide[0]);
        assert!(wide.iter().any(|l| l.starts_with("node_a |")), "{wide:#?}");
        assert!(wide.iter().any(|l| l.contains("Lag (bytes)")), "{wide:#?}");
        // Newest last, and the newest is there.
        assert!(wide[14].ends_with("event number 39"), "{wide:#?}");
        assert!(wide.iter().any(|l| l.contains("Event Time")), "{wide:#?}");
    }

    #[test]
    fn a_plain_frame_keeps_everything() {
        let snap = snapshot(3);
        let lines = frame(&snap, "default", "postgres://m/x", None);
        assert!(lines.last().is_some_and(|l| l.ends_with("event number 2")));
        assert_eq!(
            lines.iter().filter(|l| l.contains("event number")).count(),
            3
        );
    }

    #[test]
    fn quit_keys() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(quits(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('Q'), KeyModifiers::SHIFT)));
        assert!(quits(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(quits(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!quits(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!quits(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
    }

    #[test]
    fn events_room_leaves_one_row_at_least() {
        assert_eq!(events_room(2, 40), 40 - 9);
        assert_eq!(events_room(2, 5), 1);
    }
}
