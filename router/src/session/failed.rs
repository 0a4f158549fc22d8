//! A transaction lost with its server connection, as the client sees it: a
//! failed transaction (ReadyForQuery status `E`) in which every statement is
//! refused with the loss's error until the client ends it with ROLLBACK (or
//! COMMIT, which in a failed transaction rolls back), as Postgres treats any
//! failed transaction. The router answers these messages itself: there is no
//! server connection until the transaction is over.
//!
//! Why not simply report the loss once and carry on idle: the one error may
//! go to a message whose answer the client ignores (a driver's background
//! Close and Sync), and the application's next statement would then run
//! outside the transaction it believes it is in, and its COMMIT would commit
//! half a transaction.

use bytes::{BufMut, BytesMut};

use crate::client_error::ClientError;
use crate::protocol::backend::{ready_for_query, TxStatus};
use crate::protocol::cstr;
use crate::protocol::tag::{backend, frontend};
use crate::tracking::SessionState;

/// What the client's message did to the lost transaction.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Answered; the transaction is still failed.
    Answered,
    /// Answered, ending with ReadyForQuery `I`: the transaction is over.
    Ended,
    /// The transaction ended earlier in this batch: the message is not
    /// consumed and goes the usual way.
    PassOn,
}

/// The failed transaction of a session whose server connection is gone.
#[derive(Debug)]
pub(crate) struct LostTransaction {
    /// The loss's error, which every refused statement gets.
    error: ClientError,
    /// Statement names the client parsed here that end the transaction.
    exit_statements: Vec<Box<[u8]>>,
    /// Portals bound here to such statements.
    exit_portals: Vec<Box<[u8]>>,
    /// After an error in an extended-protocol batch: drop messages until Sync.
    skipping: bool,
    /// A ROLLBACK ran in the batch in progress: the transaction is over.
    ended: bool,
}

const HINT: &str =
    "The transaction was rolled back: end it with ROLLBACK, then run it again from the start.";

impl LostTransaction {
    /// `error` says why the transaction was lost; every refused statement
    /// gets it, with a hint of its own (how to end the transaction).
    pub fn new(error: ClientError) -> LostTransaction {
        LostTransaction {
            error: ClientError {
                hint: Some(HINT),
                ..error
            },
            exit_statements: Vec::new(),
            exit_portals: Vec::new(),
            skipping: false,
            ended: false,
        }
    }

    /// The client was in the middle of an extended-protocol batch: the rest
    /// of it is skipped, up to its Sync.
    pub fn skip_to_sync(&mut self) {
        self.skipping = true;
    }

    /// The error of the failed transaction.
    pub fn error(&self, out: &mut BytesMut) {
        self.error.write(out);
    }

    /// Answers one client message (`frame`: the whole message, tag first) into
    /// `out`, keeping `state` (the session's prepared statements) in step.
    pub fn on_message(
        &mut self,
        frame: &[u8],
        state: &mut SessionState,
        out: &mut BytesMut,
    ) -> Step {
        let tag = frame[0];
        let body = &frame[5..];
        if tag == frontend::SYNC {
            self.skipping = false;
            return self.ready(state, out);
        }
        if self.ended {
            return Step::PassOn;
        }
        if self.skipping {
            return Step::Answered;
        }
        match tag {
            frontend::QUERY => {
                let sql = cstr(body).map(|(sql, _)| sql).unwrap_or_default();
                if ends_transaction(sql) {
                    command_complete_rollback(out);
                    self.ended = true;
                } else {
                    self.error(out);
                }
                self.ready(state, out)
            }
            frontend::PARSE => {
                let parsed = cstr(body).and_then(|(name, rest)| Some((name, cstr(rest)?.0)));
                match parsed {
                    Some((name, sql)) if ends_transaction(sql) => {
                        self.exit_statements.retain(|n| **n != *name);
                        self.exit_statements.push(name.into());
                        state.on_parse(frame);
                        out.put_slice(&[backend::PARSE_COMPLETE, 0, 0, 0, 4]);
                    }
                    _ => self.fail(out),
                }
                Step::Answered
            }
            frontend::BIND => {
                let bound = cstr(body).and_then(|(portal, rest)| Some((portal, cstr(rest)?.0)));
                match bound {
                    Some((portal, statement)) if self.is_exit_statement(statement) => {
                        self.exit_portals.retain(|p| **p != *portal);
                        self.exit_portals.push(portal.into());
                        out.put_slice(&[backend::BIND_COMPLETE, 0, 0, 0, 4]);
                    }
                    _ => self.fail(out),
                }
                Step::Answered
            }
            frontend::DESCRIBE => {
                match body.split_first() {
                    Some((b'S', rest)) if self.is_exit_statement(name_of(rest)) => {
                        // ParameterDescription with no parameters, then NoData.
                        out.put_slice(&[backend::PARAMETER_DESCRIPTION, 0, 0, 0, 6, 0, 0]);
                        out.put_slice(&[backend::NO_DATA, 0, 0, 0, 4]);
                    }
                    Some((b'P', rest)) if self.is_exit_portal(name_of(rest)) => {
                        out.put_slice(&[backend::NO_DATA, 0, 0, 0, 4]);
                    }
                    _ => self.fail(out),
                }
                Step::Answered
            }
            frontend::EXECUTE => {
                let portal = name_of(body);
                if self.is_exit_portal(portal) {
                    command_complete_rollback(out);
                    self.ended = true;
                } else {
                    self.fail(out);
                }
                Step::Answered
            }
            frontend::CLOSE => {
                // Postgres closes statements and portals in a failed transaction.
                state.on_close(body);
                if let Some((kind, rest)) = body.split_first() {
                    let name = name_of(rest);
                    let names = if *kind == b'S' {
                        &mut self.exit_statements
                    } else {
                        &mut self.exit_portals
                    };
                    names.retain(|n| **n != *name);
                }
                out.put_slice(&[backend::CLOSE_COMPLETE, 0, 0, 0, 4]);
                Step::Answered
            }
            // Flush: everything is answered already.
            frontend::FLUSH => Step::Answered,
            // Function calls and anything else a failed transaction refuses.
            _ => {
                self.error(out);
                self.ready(state, out)
            }
        }
    }

    fn is_exit_statement(&self, name: &[u8]) -> bool {
        self.exit_statements.iter().any(|n| **n == *name)
    }

    fn is_exit_portal(&self, name: &[u8]) -> bool {
        self.exit_portals.iter().any(|n| **n == *name)
    }

    /// An error in an extended-protocol batch: the rest of it is skipped.
    fn fail(&mut self, out: &mut BytesMut) {
        self.error(out);
        self.skipping = true;
    }

    fn ready(&mut self, state: &mut SessionState, out: &mut BytesMut) -> Step {
        let status = if self.ended {
            TxStatus::Idle
        } else {
            TxStatus::Failed
        };
        ready_for_query(out, status);
        state.on_ready(status);
        if self.ended {
            Step::Ended
        } else {
            Step::Answered
        }
    }
}

fn name_of(rest: &[u8]) -> &[u8] {
    cstr(rest).map(|(name, _)| name).unwrap_or_default()
}

fn command_complete_rollback(out: &mut BytesMut) {
    const TAG: &[u8] = b"ROLLBACK\0";
    out.put_u8(backend::COMMAND_COMPLETE);
    out.put_u32((4 + TAG.len()) as u32);
    out.put_slice(TAG);
}

/// Whether `sql` is one statement that ends a transaction block: ROLLBACK,
/// ABORT, COMMIT or END, with optional WORK or TRANSACTION and AND NO CHAIN.
/// (AND CHAIN would open a new transaction on a server the router does not
/// have: it is refused, and the client's plain ROLLBACK is what ends it.)
pub(crate) fn ends_transaction(sql: &[u8]) -> bool {
    // Runs on every statement sent inside a transaction: the first word
    // decides most of them, without allocating or decoding anything.
    let is = |word: Option<&[u8]>, any: &[&str]| {
        word.is_some_and(|w| any.iter().any(|k| w.eq_ignore_ascii_case(k.as_bytes())))
    };
    let mut words = sql
        .split(|c| c.is_ascii_whitespace() || *c == b';')
        .filter(|w| !w.is_empty());
    if !is(words.next(), &["rollback", "abort", "commit", "end"]) {
        return false;
    }
    // One statement: a semicolon may only end it.
    let body = sql.trim_ascii_end();
    let body = &body[..body.len() - body.iter().rev().take_while(|c| **c == b';').count()];
    if body.contains(&b';') {
        return false;
    }
    let mut next = words.next();
    if is(next, &["work", "transaction"]) {
        next = words.next();
    }
    match next {
        None => true,
        Some(w) => {
            w.eq_ignore_ascii_case(b"and")
                && is(words.next(), &["no"])
                && is(words.next(), &["chain"])
                && words.next().is_none()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// The messages in `out`, as (tag, body).
    fn messages(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut at = 0;
        let mut all = Vec::new();
        while at < out.len() {
            let len =
                u32::from_be_bytes(out[at + 1..at + 5].try_into().expect("four bytes")) as usize;
            all.push((out[at], out[at + 5..at + 1 + len].to_vec()));
            at += 1 + len;
        }
        all
    }

    fn tags(out: &[u8]) -> String {
        messages(out).iter().map(|(t, _)| *t as char).collect()
    }

    fn run(messages: &[Vec<u8>]) -> (String, Vec<Step>) {
        let mut lost = LostTransaction::new(ClientError::error("08006", "lost", None));
        let mut state = SessionState::default();
        let mut out = BytesMut::new();
        let steps = messages
            .iter()
            .map(|m| lost.on_message(m, &mut state, &mut out))
            .collect();
        (tags(&out), steps)
    }

    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', format!("{sql}\0").as_bytes())
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        msg(
            b'B',
            format!("{portal}\0{statement}\0\0\0\0\0\0\0").as_bytes(),
        )
    }

    fn execute(portal: &str) -> Vec<u8> {
        msg(b'E', format!("{portal}\0\0\0\0\0").as_bytes())
    }

    fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    #[test]
    fn which_statements_end_a_transaction() {
        for (sql, ends) in [
            ("ROLLBACK", true),
            ("rollback;", true),
            ("  Rollback Work ; ", true),
            ("ABORT TRANSACTION", true),
            ("COMMIT", true),
            ("end", true),
            ("COMMIT AND NO CHAIN", true),
            ("COMMIT AND CHAIN", false),
            ("ROLLBACK TO SAVEPOINT a", false),
            ("ROLLBACK PREPARED 'x'", false),
            ("ROLLBACK; SELECT 1", false),
            ("SELECT 1", false),
            ("END;", true),
            ("commit\n", true),
            ("rollback ;", true),
            ("rollback ; ;", false),
            ("COMMITTED", false),
            ("endless", false),
            ("UPDATE t SET a = 1; COMMIT", false),
            ("", false),
        ] {
            assert_eq!(ends_transaction(sql.as_bytes()), ends, "{sql:?}");
        }
    }

    #[test]
    fn simple_protocol() {
        // (messages, tags answered, last step)
        let cases: Vec<(Vec<Vec<u8>>, &str, Step)> = vec![
            (vec![query("SELECT 1")], "EZ", Step::Answered),
            (
                vec![query("SELECT 1"), query("INSERT 1")],
                "EZEZ",
                Step::Answered,
            ),
            (
                vec![query("SELECT 1"), query("ROLLBACK")],
                "EZCZ",
                Step::Ended,
            ),
            (vec![query("COMMIT")], "CZ", Step::Ended),
        ];
        for (messages, want, last) in cases {
            let (got, steps) = run(&messages);
            assert_eq!(got, want, "{messages:?}");
            assert_eq!(steps.last(), Some(&last), "{messages:?}");
        }
    }

    #[test]
    fn ready_for_query_says_failed_until_the_end() {
        let mut lost = LostTransaction::new(ClientError::error("08006", "lost", None));
        let mut state = SessionState::default();
        let mut out = BytesMut::new();
        lost.on_message(&query("SELECT 1"), &mut state, &mut out);
        lost.on_message(&query("ROLLBACK"), &mut state, &mut out);
        let statuses: Vec<Vec<u8>> = messages(&out)
            .into_iter()
            .filter(|(t, _)| *t == b'Z')
            .map(|(_, b)| b)
            .collect();
        assert_eq!(statuses, vec![b"E".to_vec(), b"I".to_vec()]);
        let (_, error) = &messages(&out)[0];
        assert!(error.windows(6).any(|w| w == b"C08006"), "{error:?}");
    }

    #[test]
    fn extended_protocol() {
        let describe_statement = |name: &str| msg(b'D', format!("S{name}\0").as_bytes());
        let close_statement = |name: &str| msg(b'C', format!("S{name}\0").as_bytes());
        let cases: Vec<(Vec<Vec<u8>>, &str, Step)> = vec![
            // A statement fails; the rest of the batch is skipped.
            (
                vec![parse("", "SELECT 1"), bind("", ""), execute(""), sync()],
                "EZ",
                Step::Answered,
            ),
            // A driver's prepare then execute of ROLLBACK.
            (
                vec![
                    parse("s1", "ROLLBACK"),
                    describe_statement("s1"),
                    sync(),
                    bind("", "s1"),
                    execute(""),
                    sync(),
                ],
                "1tnZ2CZ",
                Step::Ended,
            ),
            // Unnamed, in one batch.
            (
                vec![parse("", "rollback"), bind("", ""), execute(""), sync()],
                "12CZ",
                Step::Ended,
            ),
            // Closing a statement is allowed.
            (vec![close_statement("s7"), sync()], "3Z", Step::Answered),
            // A closed exit statement no longer ends anything.
            (
                vec![
                    parse("s1", "ROLLBACK"),
                    close_statement("s1"),
                    bind("", "s1"),
                    execute(""),
                    sync(),
                ],
                "13EZ",
                Step::Answered,
            ),
            // After the ROLLBACK, the batch's other messages go the usual way.
            (
                vec![
                    parse("", "ROLLBACK"),
                    bind("", ""),
                    execute(""),
                    parse("", "SELECT 1"),
                ],
                "12C",
                Step::PassOn,
            ),
        ];
        for (messages, want, last) in cases {
            let (got, steps) = run(&messages);
            assert_eq!(got, want, "{messages:?}");
            assert_eq!(steps.last(), Some(&last), "{messages:?}");
        }
    }

    #[test]
    fn an_exit_statement_parsed_here_is_kept_for_later_servers() {
        let mut lost = LostTransaction::new(ClientError::error("08006", "lost", None));
        let mut state = SessionState::default();
        let mut out = BytesMut::new();
        for m in [
            parse("s1", "ROLLBACK"),
            sync(),
            bind("", "s1"),
            execute(""),
            sync(),
        ] {
            lost.on_message(&m, &mut state, &mut out);
        }
        assert!(state.prepared_frame(b"s1").is_some());
    }
}
