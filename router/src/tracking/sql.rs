//! Reading SQL text for what it does to session state, without a parser:
//! splitting a Query into statements, classifying each ([`classify`] into
//! [`Effect`]s), the quick first-word filter that spares plain DML the rest
//! ([`interesting`]), and the scan of a large statement streamed in pieces
//! ([`LargeSql`]).

/// What one statement does to session state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `SET [SESSION] name ...`: the statement text, replayed as is.
    Set {
        /// Lower-case parameter name (or a pseudo-name such as `timezone`).
        name: String,
        /// The statement.
        stmt: String,
    },
    /// `RESET name`.
    Reset(String),
    /// `RESET ALL`.
    ResetAll,
    /// `DISCARD ALL`: resets everything, drops temp tables, unlistens, deallocates.
    DiscardAll,
    /// `DISCARD TEMP`.
    DiscardTemp,
    /// `DEALLOCATE name`.
    Deallocate(String),
    /// `DEALLOCATE ALL`.
    DeallocateAll,
    /// `UNLISTEN *`.
    UnlistenAll,
    /// `pg_advisory_unlock_all()`.
    UnlockAll,
    /// State that cannot move.
    Sticky(Sticky),
}

/// Session state that cannot be recreated on another server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// A temporary table.
    TempTable,
    /// A session-level advisory lock.
    AdvisoryLock,
    /// LISTEN.
    Listen,
    /// SQL-level PREPARE.
    SqlPrepare,
    /// DECLARE ... WITH HOLD.
    HoldCursor,
    /// Whatever a statement too large to be read whole (streamed to the
    /// server, see [`LargeSql`]) may have set up: the router cannot tell.
    Untracked,
}

impl Sticky {
    /// What the client is told.
    pub fn describe(self) -> &'static str {
        match self {
            Sticky::TempTable => "temporary tables",
            Sticky::AdvisoryLock => "session advisory locks",
            Sticky::Listen => "LISTEN registrations",
            Sticky::SqlPrepare => "SQL PREPAREd statements",
            Sticky::HoldCursor => "WITH HOLD cursors",
            Sticky::Untracked => {
                "state set up by a statement too large for the router to read whole"
            }
        }
    }
}

/// Splits SQL text into statements (outside quotes, dollar quotes and
/// comments) and returns, for each, its byte range with leading comments and
/// whitespace skipped.
pub(super) fn statements(sql: &str) -> Vec<(usize, usize)> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                continue;
            }
            b';' => {
                if let Some(s) = start.take() {
                    out.push((s, i));
                }
                i += 1;
                continue;
            }
            c if c.is_ascii_whitespace() => {
                i += 1;
                continue;
            }
            _ => {}
        }
        if start.is_none() {
            start = Some(i);
        }
        match c {
            b'\'' | b'"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == c {
                        if b.get(i + 1) == Some(&c) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if b[e] == b'$' => {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(close) => i = e + 1 + close + tag.len(),
                            None => i = b.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    if let Some(s) = start {
        out.push((s, b.len()));
    }
    out
}

/// The first `n` words of a statement, lower-cased (identifiers, not quoted).
fn words(stmt: &str, n: usize) -> Vec<String> {
    stmt.split(|c: char| c.is_ascii_whitespace() || c == '=' || c == '(' || c == ';')
        .filter(|w| !w.is_empty())
        .take(n)
        .map(|w| w.to_ascii_lowercase())
        .collect()
}

/// Whether the ASCII `needle` occurs in `haystack`, whatever the case of
/// either. It runs on every statement, so it jumps (memchr) from one
/// occurrence of one of the needle's bytes to the next and compares only
/// there; the byte is the needle's rarest in English and SQL text, so that
/// few places need a compare.
pub(crate) fn contains_ci(haystack: impl AsRef<[u8]>, needle: &str) -> bool {
    let (hay, needle) = (haystack.as_ref(), needle.as_bytes());
    if needle.is_empty() {
        return true;
    }
    let anchor = (0..needle.len())
        .max_by_key(|&i| rarity(needle[i]))
        .unwrap_or(0);
    let b = needle[anchor];
    memchr::memchr2_iter(b.to_ascii_lowercase(), b.to_ascii_uppercase(), hay).any(|at| {
        at >= anchor
            && hay
                .get(at - anchor..at - anchor + needle.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(needle))
    })
}

/// How rare a byte is in SQL text: letters by their frequency in English
/// (z the rarest), everything else as common as the commonest letter.
fn rarity(b: u8) -> u8 {
    const RARITY: [u8; 256] = {
        const COMMONEST_FIRST: &[u8] = b"etaoinsrhldcumfpgwybvkxjqz";
        let mut table = [0; 256];
        let mut i = 0;
        while i < COMMONEST_FIRST.len() {
            let c = COMMONEST_FIRST[i];
            table[c as usize] = i as u8;
            table[c.to_ascii_uppercase() as usize] = i as u8;
            i += 1;
        }
        table
    };
    RARITY[b as usize]
}

/// What the router can tell of a statement text too large to hold (a Query
/// or Parse streamed to the server in pieces), reading each piece once and
/// keeping nothing of it: whether it is one plain DML or transaction-control
/// statement without "advisory" (see [`interesting`]), which changes no
/// session state. Anything else may have (a SET or a LISTEN after a large
/// INSERT), and the session is then treated as holding state that cannot
/// move ([`Sticky::Untracked`]).
#[derive(Debug)]
pub(crate) struct LargeSql {
    /// The first word is plain (the prefix starts one plain statement).
    plain: bool,
    /// A semicolon was seen: any text but more semicolons and white space
    /// after it starts another statement.
    after_semicolon: bool,
    /// Another statement may follow, or "advisory" was seen.
    suspicious: bool,
    /// The last bytes of the previous piece, for a word split across pieces.
    carry: Vec<u8>,
    /// The text ended (its terminating NUL was seen).
    done: bool,
}

impl LargeSql {
    /// Starts with the first piece of the text (no NUL in it).
    pub fn new(first: &[u8]) -> LargeSql {
        let mut scan = LargeSql {
            plain: !interesting(first_word(first)),
            after_semicolon: false,
            suspicious: false,
            carry: Vec::new(),
            done: false,
        };
        scan.feed(first);
        scan
    }

    /// The next piece; the text ends at a NUL (what follows, a Parse's
    /// parameter types, is not text).
    pub fn feed(&mut self, piece: &[u8]) {
        if self.done || self.suspicious {
            return;
        }
        let piece = match memchr::memchr(0, piece) {
            Some(nul) => {
                self.done = true;
                &piece[..nul]
            }
            None => piece,
        };
        const WORD: &str = "advisory";
        const KEEP: usize = WORD.len() - 1;
        let mut seam = std::mem::take(&mut self.carry);
        let joined = seam.len();
        seam.extend_from_slice(&piece[..piece.len().min(KEEP)]);
        if contains_ci(&seam, WORD) || contains_ci(piece, WORD) {
            self.suspicious = true;
            return;
        }
        let mut rest = piece;
        loop {
            if self.after_semicolon {
                match rest
                    .iter()
                    .position(|c| !c.is_ascii_whitespace() && *c != b';')
                {
                    Some(_) => {
                        self.suspicious = true;
                        return;
                    }
                    None => break,
                }
            }
            match memchr::memchr(b';', rest) {
                Some(at) => {
                    self.after_semicolon = true;
                    rest = &rest[at + 1..];
                }
                None => break,
            }
        }
        // The last KEEP bytes of everything so far.
        seam.truncate(joined);
        seam.extend_from_slice(&piece[piece.len().saturating_sub(KEEP)..]);
        let cut = seam.len().saturating_sub(KEEP);
        seam.drain(..cut);
        self.carry = seam;
    }

    /// Whether the statement may have changed session state.
    pub fn may_change_state(&self) -> bool {
        !self.plain || self.suspicious
    }
}

/// The text up to the end of its first word (leading white space included).
fn first_word(sql: &[u8]) -> &[u8] {
    let start = sql
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(sql.len());
    let end = sql[start..]
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
        .map_or(sql.len(), |n| start + n);
    &sql[..end]
}

/// Quick check: can this SQL possibly change tracked session state? It runs
/// on every Query message, so it looks at bytes (no UTF-8 check) and at the
/// first word only, unless that word starts something else than one plain
/// statement.
pub(crate) fn interesting(sql: impl AsRef<[u8]>) -> bool {
    // DML, and transaction control (pgbench's TPC-B sends BEGIN; and END;
    // on their own), change no session state by themselves.
    const PLAIN: [&[u8]; 10] = [
        b"select",
        b"insert",
        b"update",
        b"delete",
        b"begin",
        b"start",
        b"commit",
        b"end",
        b"rollback",
        b"abort",
    ];
    let sql = sql.as_ref();
    let start = sql
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(sql.len());
    let word_end = sql[start..]
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
        .map_or(sql.len(), |n| start + n);
    let word = &sql[start..word_end];
    let plain_word = PLAIN.iter().any(|w| w.eq_ignore_ascii_case(word));
    // A statement's own trailing semicolon (pgbench sends one) starts no
    // second statement; any other one might.
    let mut end = sql.trim_ascii_end().len();
    while end > 0 && sql[end - 1] == b';' {
        end -= 1;
    }
    let one_statement = memchr::memchr(b';', &sql[..end]).is_none();
    !(plain_word && one_statement) || contains_ci(sql, "advisory")
}

/// The session-state effects of the statements in `sql`.
pub fn classify(sql: &str) -> Vec<Effect> {
    let mut out = Vec::new();
    if !interesting(sql) {
        return out;
    }
    for (s, e) in statements(sql) {
        let stmt = &sql[s..e];
        let w = words(stmt, 6);
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        match w.as_slice() {
            ["set", "local", ..] | ["set", "transaction", ..] | ["set", "constraints", ..] => {}
            ["set", "session", "characteristics", ..] => out.push(Effect::Set {
                name: "session characteristics".into(),
                stmt: stmt.to_string(),
            }),
            ["set", "session", "authorization", ..] => out.push(Effect::Set {
                name: "session_authorization".into(),
                stmt: stmt.to_string(),
            }),
            ["set", rest @ ..] => {
                let rest = if rest.first() == Some(&"session") {
                    &rest[1..]
                } else {
                    rest
                };
                let name = match rest {
                    ["time", "zone", ..] => "timezone".to_string(),
                    ["names", ..] => "client_encoding".to_string(),
                    ["schema", ..] => "search_path".to_string(),
                    [name, ..] => name.trim_matches('"').to_string(),
                    [] => continue,
                };
                out.push(Effect::Set {
                    name,
                    stmt: stmt.to_string(),
                });
            }
            ["reset", "all", ..] => out.push(Effect::ResetAll),
            ["reset", "time", "zone", ..] => out.push(Effect::Reset("timezone".into())),
            ["reset", "session", "authorization", ..] => {
                out.push(Effect::Reset("session_authorization".into()))
            }
            ["reset", name, ..] => out.push(Effect::Reset(name.trim_matches('"').to_string())),
            ["discard", "all", ..] => out.push(Effect::DiscardAll),
            ["discard", "temp", ..] | ["discard", "temporary", ..] => out.push(Effect::DiscardTemp),
            ["deallocate", "prepare", "all", ..] | ["deallocate", "all", ..] => {
                out.push(Effect::DeallocateAll)
            }
            ["deallocate", "prepare", name, ..] | ["deallocate", name, ..] => {
                out.push(Effect::Deallocate(name.trim_matches('"').to_string()))
            }
            ["unlisten", "*", ..] => out.push(Effect::UnlistenAll),
            ["listen", ..] => out.push(Effect::Sticky(Sticky::Listen)),
            // PREPARE TRANSACTION is two-phase commit, not a statement.
            ["prepare", "transaction", ..] => {}
            ["prepare", ..] => out.push(Effect::Sticky(Sticky::SqlPrepare)),
            ["declare", ..] if contains_ci(stmt, "with hold") => {
                out.push(Effect::Sticky(Sticky::HoldCursor))
            }
            ["create", "temp" | "temporary", ..]
            | ["create", "global" | "local", "temp" | "temporary", ..]
            | ["create", "unlogged", "temp" | "temporary", ..]
                if !contains_ci(stmt, "on commit drop") =>
            {
                out.push(Effect::Sticky(Sticky::TempTable))
            }
            _ => {}
        }
        if contains_ci(stmt, "advisory") {
            if contains_ci(stmt, "pg_advisory_unlock_all") {
                out.push(Effect::UnlockAll);
            } else if (contains_ci(stmt, "pg_advisory_lock")
                || contains_ci(stmt, "pg_try_advisory_lock"))
                && !contains_ci(stmt, "advisory_xact_lock")
            {
                out.push(Effect::Sticky(Sticky::AdvisoryLock));
            }
        }
    }
    out
}
