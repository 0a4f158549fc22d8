//! The tracker's rules, one row each (see the rules in `tracker.rs`).

use super::*;

use ClientMsg::*;
use TxStatus::*;

/// What happens to the tracker, in order.
#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A client message forwarded.
    C(ClientMsg),
    /// ReadyForQuery from the server.
    Z(TxStatus),
    /// The router fails a client message itself.
    Refuse(ClientMsg),
    /// A client message while skipping (dropped).
    Skip(ClientMsg),
    /// The server connection is lost.
    Loss,
    /// A server message of this many bytes, of which this many arrived.
    ServerPart(usize, usize),
    /// This many more bytes of it.
    ServerMore(usize),
    /// A client message with this many bytes still to come.
    ClientPart(usize),
    /// This many more bytes of it.
    ClientMore(usize),
}
use Ev::*;

/// What a row expects at its end.
#[derive(Debug, PartialEq, Eq)]
struct Want {
    tx: TxStatus,
    outstanding: u32,
    boundary: bool,
    idle: bool,
    skipping: bool,
    ending: Option<u32>,
}

fn want(tx: TxStatus, outstanding: u32, boundary: bool) -> Want {
    Want {
        tx,
        outstanding,
        boundary,
        idle: boundary,
        skipping: false,
        ending: None,
    }
}

/// Runs `events`; returns the end state, the ReadyForQuery messages the
/// router owes the client itself, and the last loss seen.
fn run(events: &[Ev]) -> (Want, u32, Option<InFlight>) {
    let mut t = Tracker::default();
    let mut owed = 0;
    let mut lost = None;
    for ev in events {
        match *ev {
            C(m) => t.on_client(m),
            Z(s) => {
                t.on_ready(s);
            }
            Refuse(m) => owed += u32::from(t.on_refused(m)),
            Skip(m) => owed += u32::from(t.on_skipped(m)),
            Loss => lost = Some(t.on_loss()),
            ServerPart(len, got) => t.server_streaming(len, got),
            ServerMore(n) => t.server_passed(n),
            ClientPart(more) => t.client_streaming(more),
            ClientMore(n) => {
                t.client_passed(n);
            }
        }
    }
    let end = Want {
        tx: t.tx(),
        outstanding: t.outstanding(),
        boundary: t.at_boundary(),
        idle: t.idle(),
        skipping: t.skipping(),
        ending: t.ending,
    };
    (end, owed, lost)
}

const Q: Ev = C(Query { ends: false });
const COMMIT: Ev = C(Query { ends: true });
const P: Ev = C(Parse {
    unnamed_ends: Some(false),
});
const B: Ev = C(Bind { named_ends: None });
const E: Ev = C(Execute);
const S: Ev = C(Sync);

#[test]
fn protocol_rules() {
    // (rule, events, state at the end, ReadyForQuery the router owes)
    let rows: Vec<(&str, Vec<Ev>, Want, u32)> = vec![
        (
            "simple query: sent, then answered",
            vec![Q],
            want(Idle, 1, false),
            0,
        ),
        (
            "simple query answered: at a boundary",
            vec![Q, Z(Idle)],
            want(Idle, 0, true),
            0,
        ),
        (
            "BEGIN: in a transaction block, not at a boundary",
            vec![Q, Z(InTransaction)],
            want(InTransaction, 0, false),
            0,
        ),
        (
            "a failed transaction is no boundary",
            vec![Q, Z(Failed)],
            want(Failed, 0, false),
            0,
        ),
        (
            "COMMIT in a transaction marks its ReadyForQuery",
            vec![Q, Z(InTransaction), COMMIT],
            Want {
                ending: Some(1),
                ..want(InTransaction, 1, false)
            },
            0,
        ),
        (
            "COMMIT answered: at a boundary",
            vec![Q, Z(InTransaction), COMMIT, Z(Idle)],
            want(Idle, 0, true),
            0,
        ),
        (
            "COMMIT outside a transaction ends nothing",
            vec![COMMIT],
            want(Idle, 1, false),
            0,
        ),
        (
            "pipelined: the COMMIT's ReadyForQuery is the second",
            vec![Q, Z(InTransaction), Q, COMMIT],
            Want {
                ending: Some(2),
                ..want(InTransaction, 2, false)
            },
            0,
        ),
        (
            "pipelined: one answered, the COMMIT's still to come",
            vec![Q, Z(InTransaction), Q, COMMIT, Z(InTransaction)],
            Want {
                ending: Some(1),
                ..want(InTransaction, 1, false)
            },
            0,
        ),
        (
            "pipelined queries: each ReadyForQuery answers one",
            vec![Q, Q, Q, Z(Idle), Z(Idle)],
            want(Idle, 1, false),
            0,
        ),
        (
            "extended batch: open until its Sync",
            vec![P, B, E],
            want(Idle, 0, false),
            0,
        ),
        (
            "extended batch: Sync sent",
            vec![P, B, E, S],
            want(Idle, 1, false),
            0,
        ),
        (
            "extended batch answered",
            vec![P, B, E, S, Z(Idle)],
            want(Idle, 0, true),
            0,
        ),
        (
            "Flush closes no batch",
            vec![P, B, C(Describe), E, C(Flush)],
            want(Idle, 0, false),
            0,
        ),
        (
            "Close opens a batch too",
            vec![C(Close)],
            want(Idle, 0, false),
            0,
        ),
        (
            "pipelined batches",
            vec![P, B, E, S, B, E, S, Z(Idle)],
            want(Idle, 1, false),
            0,
        ),
        (
            "Bind of the unnamed ROLLBACK in a transaction: the next Sync's",
            vec![
                Q,
                Z(InTransaction),
                C(Parse {
                    unnamed_ends: Some(true),
                }),
                B,
                E,
            ],
            Want {
                ending: Some(1),
                ..want(InTransaction, 0, false)
            },
            0,
        ),
        (
            "Bind of a named ROLLBACK in a transaction",
            vec![
                Q,
                Z(InTransaction),
                C(Bind {
                    named_ends: Some(true),
                }),
                E,
                S,
            ],
            Want {
                ending: Some(1),
                ..want(InTransaction, 1, false)
            },
            0,
        ),
        (
            "a named Parse leaves the unnamed statement's ending alone",
            vec![
                C(Parse {
                    unnamed_ends: Some(true),
                }),
                C(Parse { unnamed_ends: None }),
                S,
                Z(InTransaction),
                B,
            ],
            Want {
                ending: Some(1),
                ..want(InTransaction, 0, false)
            },
            0,
        ),
        (
            "Sync after a server error: one ReadyForQuery ends it",
            vec![P, B, E, S, Z(Idle)],
            want(Idle, 0, true),
            0,
        ),
        (
            "COPY FROM STDIN: data is inside its Query's answer",
            vec![Q, C(Copy), C(Copy), C(Copy)],
            want(Idle, 1, false),
            0,
        ),
        (
            "COPY FROM STDIN done and answered",
            vec![Q, C(Copy), C(Copy), Z(Idle)],
            want(Idle, 0, true),
            0,
        ),
        (
            "COPY TO STDOUT: streamed rows keep it off a boundary",
            vec![Q, ServerPart(100, 10), ServerMore(40)],
            Want {
                idle: false,
                ..want(Idle, 1, false)
            },
            0,
        ),
        (
            "a streamed server message that ended",
            vec![Q, ServerPart(100, 10), ServerMore(90), Z(Idle)],
            want(Idle, 0, true),
            0,
        ),
        (
            "a large client message half sent: at no boundary",
            vec![ClientPart(1000)],
            Want {
                idle: false,
                ..want(Idle, 0, true)
            },
            0,
        ),
        (
            "a large client message sent whole",
            vec![ClientPart(1000), ClientMore(400), ClientMore(600)],
            want(Idle, 0, true),
            0,
        ),
        (
            "the router fails a Query: ReadyForQuery at once",
            vec![Refuse(Query { ends: false })],
            want(Idle, 0, true),
            1,
        ),
        (
            "the router fails a Parse: skip to the Sync",
            vec![
                Refuse(Parse {
                    unnamed_ends: Some(false),
                }),
                Skip(Bind { named_ends: None }),
                Skip(Execute),
            ],
            Want {
                skipping: true,
                ..want(Idle, 0, true)
            },
            0,
        ),
        (
            "the Sync after a failed batch gets the ReadyForQuery",
            vec![
                Refuse(Parse {
                    unnamed_ends: Some(false),
                }),
                Skip(Execute),
                Skip(Sync),
            ],
            want(Idle, 0, true),
            1,
        ),
        (
            "the router fails a Sync: answered at once",
            vec![Refuse(Sync)],
            want(Idle, 0, true),
            1,
        ),
        (
            "loss while idle",
            vec![Q, Z(Idle), Loss],
            want(Idle, 0, true),
            0,
        ),
        (
            "loss in a transaction: failed, nothing outstanding",
            vec![Q, Z(InTransaction), Q, Loss],
            want(Failed, 0, false),
            0,
        ),
        (
            "loss during a statement outside a transaction",
            vec![Q, Loss],
            want(Idle, 0, true),
            0,
        ),
        (
            "loss in an open batch outside a transaction: skip to its Sync",
            vec![P, B, Loss],
            Want {
                skipping: true,
                ..want(Idle, 0, true)
            },
            0,
        ),
        (
            "loss during a COMMIT: the transaction is over",
            vec![Q, Z(InTransaction), COMMIT, Loss],
            want(Idle, 0, true),
            0,
        ),
    ];
    for (rule, events, end, owed) in rows {
        let (got, got_owed, _) = run(&events);
        assert_eq!(got, end, "{rule}");
        assert_eq!(got_owed, owed, "{rule}: ReadyForQuery owed by the router");
    }
}

#[test]
fn what_was_in_flight_at_a_loss() {
    // (rule, events, in flight)
    let rows: Vec<(&str, Vec<Ev>, InFlight)> = vec![
        (
            "idle",
            vec![Q, Z(Idle), Loss],
            InFlight {
                in_tx: false,
                statement: false,
                ending: false,
                outstanding: 0,
                open_batch: false,
            },
        ),
        (
            "a statement outside a transaction",
            vec![Q, Loss],
            InFlight {
                in_tx: false,
                statement: true,
                ending: false,
                outstanding: 1,
                open_batch: false,
            },
        ),
        (
            "idle in a transaction",
            vec![Q, Z(InTransaction), Loss],
            InFlight {
                in_tx: true,
                statement: false,
                ending: false,
                outstanding: 0,
                open_batch: false,
            },
        ),
        (
            "a batch open in a transaction",
            vec![Q, Z(InTransaction), P, B, Loss],
            InFlight {
                in_tx: true,
                statement: true,
                ending: false,
                outstanding: 0,
                open_batch: true,
            },
        ),
        (
            "the COMMIT in flight",
            vec![Q, Z(InTransaction), COMMIT, Loss],
            InFlight {
                in_tx: false,
                statement: true,
                ending: true,
                outstanding: 1,
                open_batch: false,
            },
        ),
        (
            "pipelined, two answers owed",
            vec![Q, Q, Loss],
            InFlight {
                in_tx: false,
                statement: true,
                ending: false,
                outstanding: 2,
                open_batch: false,
            },
        ),
    ];
    for (rule, events, want) in rows {
        let (_, _, lost) = run(&events);
        assert_eq!(lost, Some(want), "{rule}");
    }
}

#[test]
fn message_types() {
    // (tag, message, starts work, brings ReadyForQuery, may be large)
    let rows = [
        (b'Q', Some(Query { ends: false }), true, true, true),
        (b'F', Some(FunctionCall), true, true, true),
        (b'P', Some(Parse { unnamed_ends: None }), true, false, true),
        (
            b'B',
            Some(Bind {
                named_ends: Some(false),
            }),
            true,
            false,
            true,
        ),
        (b'D', Some(Describe), true, false, false),
        (b'E', Some(Execute), true, false, false),
        (b'C', Some(Close), true, false, false),
        (b'S', Some(Sync), true, true, false),
        (b'H', Some(Flush), false, false, false),
        (b'd', Some(Copy), false, false, true),
        (b'c', Some(Copy), false, false, true),
        (b'f', Some(Copy), false, false, true),
        (b'X', None, false, false, false),
        (b'p', None, false, false, false),
        (b'Z', None, false, false, false),
    ];
    for (tag, msg, work, ready, large) in rows {
        assert_eq!(ClientMsg::of(tag), msg, "{}", tag as char);
        if let Some(m) = msg {
            assert_eq!(
                (m.starts_work(), m.brings_ready(), m.may_be_large()),
                (work, ready, large),
                "{}",
                tag as char
            );
        }
    }
}

#[test]
fn half_close_waits_for_what_is_owed() {
    // The client sent a Query and closed its side: the session ends once
    // the server owes nothing more.
    let mut t = Tracker::default();
    t.on_client(Query { ends: false });
    assert!(!t.owed_nothing());
    t.server_streaming(50, 10);
    t.on_ready(Idle);
    assert!(!t.owed_nothing(), "half a server message still to come");
    t.server_passed(40);
    assert!(t.owed_nothing());
}

#[test]
fn a_connection_skipping_a_batch_is_not_reusable() {
    let mut t = Tracker::default();
    t.on_refused(Parse {
        unnamed_ends: Some(false),
    });
    assert!(t.idle() && !t.reusable());
    t.on_skipped(Sync);
    assert!(t.reusable());
}
