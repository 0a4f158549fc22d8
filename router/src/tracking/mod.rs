//! Session state the router tracks so that a client can be moved to a new
//! server connection: session-level SET/RESET (replayed), named protocol-level
//! prepared statements (re-parsed), and the state that cannot move (temporary
//! tables, session advisory locks, LISTEN, SQL-level PREPARE, WITH HOLD
//! cursors), which turns a move into a clear error instead.

mod sql;

use bytes::Bytes;

pub(crate) use self::sql::{classify, contains_ci, interesting, Effect, LargeSql, Sticky};
use crate::protocol::backend::TxStatus;
use crate::protocol::cstr;

/// The tracked state of one client session.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Committed session-level SETs, in order, one per name.
    sets: Vec<(String, String)>,
    /// SET/RESET effects of the transaction in progress.
    pending: Vec<Effect>,
    /// Named protocol-level prepared statements: name and the Parse frame.
    prepared: Vec<(String, Bytes)>,
    /// Parse frames sent since the last ReadyForQuery.
    pending_parses: Vec<(String, Bytes)>,
    /// Closes/deallocations since the last ReadyForQuery.
    pending_closes: Vec<String>,
    /// State that cannot move.
    sticky: Vec<Sticky>,
    /// An ErrorResponse was seen since the last ReadyForQuery.
    cycle_error: bool,
    /// A ROLLBACK completed since the last ReadyForQuery.
    cycle_rollback: bool,
}

impl SessionState {
    /// A Query's SQL is being sent.
    pub fn on_query(&mut self, sql: &str) {
        for effect in classify(sql) {
            match effect {
                Effect::Sticky(s) => {
                    if !self.sticky.contains(&s) {
                        self.sticky.push(s);
                    }
                }
                Effect::DiscardAll => {
                    self.sticky.clear();
                    self.pending_closes.push(String::new());
                    self.pending.push(Effect::ResetAll);
                }
                Effect::DiscardTemp => self.sticky.retain(|s| *s != Sticky::TempTable),
                Effect::UnlistenAll => self.sticky.retain(|s| *s != Sticky::Listen),
                Effect::UnlockAll => self.sticky.retain(|s| *s != Sticky::AdvisoryLock),
                Effect::DeallocateAll => {
                    self.sticky.retain(|s| *s != Sticky::SqlPrepare);
                    self.pending_closes.push(String::new());
                }
                Effect::Deallocate(name) => self.pending_closes.push(name),
                e @ (Effect::Set { .. } | Effect::Reset(_) | Effect::ResetAll) => {
                    self.pending.push(e)
                }
            }
        }
    }

    /// A Parse message (whole frame) is being sent.
    pub fn on_parse(&mut self, frame: &[u8]) {
        let Some((name, rest)) = frame.get(5..).and_then(cstr) else {
            return;
        };
        if let Some((query, _)) = cstr(rest) {
            if let Ok(sql) = std::str::from_utf8(query) {
                self.on_query(sql);
            }
        }
        if !name.is_empty() {
            let name = String::from_utf8_lossy(name).into_owned();
            self.pending_parses
                .push((name, Bytes::copy_from_slice(frame)));
        }
    }

    /// A Close message body is being sent.
    pub fn on_close(&mut self, body: &[u8]) {
        if let [b'S', rest @ ..] = body {
            if let Some((name, _)) = cstr(rest) {
                if !name.is_empty() {
                    self.pending_closes
                        .push(String::from_utf8_lossy(name).into_owned());
                }
            }
        }
    }

    /// The server reported an error (not fatal).
    pub fn on_error(&mut self) {
        self.cycle_error = true;
    }

    /// The server completed a command with this tag.
    pub fn on_command_complete(&mut self, tag: &[u8]) {
        if tag.starts_with(b"ROLLBACK") {
            self.cycle_rollback = true;
        }
    }

    /// ReadyForQuery with this status: commits or discards what is pending.
    pub fn on_ready(&mut self, status: TxStatus) {
        for name in self.pending_closes.drain(..) {
            if name.is_empty() {
                self.prepared.clear();
            } else {
                self.prepared.retain(|(n, _)| *n != name);
            }
        }
        if !self.cycle_error {
            for (name, frame) in self.pending_parses.drain(..) {
                self.prepared.retain(|(n, _)| *n != name);
                self.prepared.push((name, frame));
            }
        }
        self.pending_parses.clear();
        if status == TxStatus::Idle {
            if !self.cycle_error && !self.cycle_rollback {
                for effect in std::mem::take(&mut self.pending) {
                    match effect {
                        Effect::Set { name, stmt } => {
                            self.sets.retain(|(n, _)| *n != name);
                            self.sets.push((name, stmt));
                        }
                        Effect::Reset(name) => self.sets.retain(|(n, _)| *n != name),
                        Effect::ResetAll => self.sets.clear(),
                        _ => {}
                    }
                }
            }
            self.pending.clear();
        }
        self.cycle_error = false;
        self.cycle_rollback = false;
    }

    /// The transaction in progress is gone (server connection lost).
    pub fn discard_pending(&mut self) {
        self.pending.clear();
        self.pending_parses.clear();
        self.pending_closes.clear();
        self.cycle_error = false;
        self.cycle_rollback = false;
    }

    /// A statement too large to read whole was sent, and it may have set up
    /// anything.
    pub fn mark_untracked(&mut self) {
        if !self.sticky.contains(&Sticky::Untracked) {
            self.sticky.push(Sticky::Untracked);
        }
    }

    /// State that cannot move, if any.
    pub fn sticky(&self) -> Option<Sticky> {
        self.sticky.first().copied()
    }

    /// The SET statements to replay, in order.
    pub fn sets(&self) -> impl Iterator<Item = &str> {
        self.sets.iter().map(|(_, s)| s.as_str())
    }

    /// The Parse frame of the named statement `name` as the client last
    /// prepared it (in the batch in progress or before).
    pub fn prepared_frame(&self, name: &[u8]) -> Option<&Bytes> {
        self.pending_parses
            .iter()
            .rev()
            .chain(self.prepared.iter().rev())
            .find(|(n, _)| n.as_bytes() == name)
            .map(|(_, f)| f)
    }

    /// The Parse frames to replay, concatenated.
    pub fn prepared_frames(&self) -> Vec<u8> {
        self.prepared
            .iter()
            .flat_map(|(_, f)| f.iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::sql::statements;
    use super::*;

    #[test]
    fn splits_statements_outside_quotes() {
        let sql = "SET a = 'x;y'; /* c; */ SELECT $$;$$; -- x;\n SET \"b;\" TO 1";
        let parts: Vec<&str> = statements(sql).iter().map(|&(s, e)| &sql[s..e]).collect();
        assert_eq!(
            parts,
            vec!["SET a = 'x;y'", "SELECT $$;$$", "SET \"b;\" TO 1"]
        );
    }

    #[test]
    fn finds_words_whatever_their_case() {
        assert!(contains_ci("select pg_ADVISORY_lock(1)", "advisory"));
        assert!(contains_ci("Advisory", "advisory"));
        assert!(contains_ci("x advisorY", "advisory"));
        assert!(!contains_ci("advisor", "advisory"));
        assert!(!contains_ci("", "advisory"));
        assert!(contains_ci("DISCARD ALL", "discard"));
        assert!(contains_ci("x ON COMMIT DROP", "on commit drop"));
        assert!(contains_ci("declare c cursor WITH HOLD for", "with hold"));
        assert!(!contains_ci("with  hold", "with hold"));
        assert!(contains_ci("aaaa", "aaa"));
        assert!(contains_ci(b"dd", ""));
        assert!(contains_ci("DECLARE c CURSOR WITH HOLD FOR", "with hold"));
    }

    #[test]
    fn a_single_dml_or_transaction_control_statement_is_not_parsed_further() {
        assert!(!interesting(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;"
        ));
        assert!(!interesting("update t set a = 1 ;\n"));
        assert!(!interesting("  insert into t values (1)"));
        assert!(!interesting("select(1)"));
        for sql in [
            "BEGIN;",
            "begin isolation level serializable",
            "START TRANSACTION READ ONLY;",
            "END;",
            "commit",
            "ROLLBACK TO SAVEPOINT a",
            "abort;",
        ] {
            assert!(!interesting(sql), "{sql}");
        }
        assert!(interesting("BEGIN; SET search_path = x;"));
        assert!(interesting("endless = 1"));
        assert!(interesting("selecting 1"));
        assert!(interesting("SELECT 1; SET search_path = x;"));
        assert!(interesting("select 1;set a = 1"));
        assert!(interesting("select pg_advisory_lock(1);"));
        assert!(interesting("SET a = 1;"));
    }

    #[test]
    fn a_large_statement_read_in_pieces_is_plain_only_when_it_is_one_plain_statement() {
        let scan = |pieces: &[&str]| {
            let mut s = LargeSql::new(pieces[0].as_bytes());
            for p in &pieces[1..] {
                s.feed(p.as_bytes());
            }
            s.may_change_state()
        };
        let cases: &[(&[&str], bool)] = &[
            (&["INSERT INTO t VALUES ('", "xxxx", "xx')\0"], false),
            (
                &["INSERT INTO t VALUES ('", "xxxx", "')  ;  \n", "\0"],
                false,
            ),
            (&["INSERT INTO t VALUES ('", "xx');", " SET a = 1\0"], true),
            (
                &["INSERT INTO t VALUES ('", "xx')", ";", "  ", "LISTEN x\0"],
                true,
            ),
            (&["SET a = '", "xxxx'\0"], true),
            (&["select '", "pg_adv", "isory_lock'\0"], true),
            (&["select '", "x ADVISORY x'\0"], true),
            // After the text's NUL (a Parse's parameter types), nothing counts.
            (&["select '", "x'\0;abc"], false),
            (&["  update t set a = '", "x'\0"], false),
            (&["with x as (select 1) ", "select 1\0"], true),
        ];
        for (pieces, expected) in cases {
            assert_eq!(scan(pieces), *expected, "{pieces:?}");
        }
    }

    #[test]
    fn classifies() {
        assert_eq!(classify("select 1"), vec![]);
        assert_eq!(
            classify("SET work_mem = '64MB'"),
            vec![Effect::Set {
                name: "work_mem".into(),
                stmt: "SET work_mem = '64MB'".into()
            }]
        );
        assert_eq!(classify("set local work_mem to 1"), vec![]);
        assert!(
            matches!(&classify("SET TIME ZONE 'UTC'")[0], Effect::Set { name, .. } if name == "timezone")
        );
        assert_eq!(classify("RESET ALL"), vec![Effect::ResetAll]);
        assert_eq!(
            classify("create temp table t(x int)"),
            vec![Effect::Sticky(Sticky::TempTable)]
        );
        assert_eq!(
            classify("create temp table t(x int) on commit drop"),
            vec![]
        );
        assert_eq!(
            classify("SELECT pg_advisory_lock(1)"),
            vec![Effect::Sticky(Sticky::AdvisoryLock)]
        );
        assert_eq!(classify("SELECT pg_advisory_xact_lock(1)"), vec![]);
        assert_eq!(classify("LISTEN x"), vec![Effect::Sticky(Sticky::Listen)]);
        assert_eq!(
            classify("PREPARE q AS SELECT 1"),
            vec![Effect::Sticky(Sticky::SqlPrepare)]
        );
        assert_eq!(classify("PREPARE TRANSACTION 'gid'"), vec![]);
        assert_eq!(classify("DISCARD ALL"), vec![Effect::DiscardAll]);
    }

    #[test]
    fn sets_commit_only_when_the_transaction_does() {
        let mut s = SessionState::default();
        s.on_query("SET a = 1");
        s.on_ready(TxStatus::Idle);
        assert_eq!(s.sets().collect::<Vec<_>>(), vec!["SET a = 1"]);
        s.on_query("BEGIN; SET b = 2");
        s.on_ready(TxStatus::InTransaction);
        s.on_query("ROLLBACK");
        s.on_command_complete(b"ROLLBACK");
        s.on_ready(TxStatus::Idle);
        assert_eq!(s.sets().collect::<Vec<_>>(), vec!["SET a = 1"]);
        s.on_query("SET bogus = 1");
        s.on_error();
        s.on_ready(TxStatus::Idle);
        assert_eq!(s.sets().count(), 1);
        s.on_query("SET a = 3");
        s.on_ready(TxStatus::Idle);
        assert_eq!(s.sets().collect::<Vec<_>>(), vec!["SET a = 3"]);
        s.on_query("RESET a");
        s.on_ready(TxStatus::Idle);
        assert_eq!(s.sets().count(), 0);
        s.on_query("LISTEN x");
        assert_eq!(s.sticky(), Some(Sticky::Listen));
        s.on_query("DISCARD ALL");
        assert_eq!(s.sticky(), None);
    }
}
