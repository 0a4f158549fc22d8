//! The user list (`auth.file`): lines of `"user" "secret"`, PgBouncer's
//! `auth_file` format. A secret is a plain password, `md5` + 32 hex digits, or
//! a SCRAM verifier `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use super::mock::MockKey;
use super::scram::{derive, ScramSecret, DEFAULT_ITERATIONS};
use super::AuthError;

/// A stored secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A plain-text password (also usable to log into servers).
    Plain(String),
    /// `md5` followed by md5(password + user) in hex (the 32 hex digits kept).
    Md5(String),
    /// A SCRAM-SHA-256 verifier.
    Scram(ScramSecret),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Plain(_) => "Plain(****)",
            Secret::Md5(_) => "Md5(****)",
            Secret::Scram(_) => "Scram(****)",
        })
    }
}

impl Secret {
    /// Reads a secret as written in the auth file. A secret that starts as a
    /// verifier does (`md5`, `SCRAM-SHA-256$`) must be one: taken as a plain
    /// password, the verifier text itself would log in and the real password
    /// would not.
    pub fn parse(text: &str) -> Result<Secret, SecretError> {
        if let Some(hex) = text.strip_prefix("md5") {
            if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(Secret::Md5(hex.to_ascii_lowercase()));
            }
            return Err(SecretError::Md5);
        }
        if let Some(rest) = text.strip_prefix("SCRAM-SHA-256$") {
            return parse_scram(rest).map(Secret::Scram);
        }
        Ok(Secret::Plain(text.to_string()))
    }

    /// The plain password, when the file holds one.
    pub fn plain(&self) -> Option<&str> {
        match self {
            Secret::Plain(p) => Some(p),
            _ => None,
        }
    }

    /// The file holds an empty password: nobody logs in with it (Postgres
    /// and PgBouncer refuse empty passwords too).
    pub fn is_empty_password(&self) -> bool {
        matches!(self, Secret::Plain(p) if p.is_empty())
    }
}

/// A secret that starts as a verifier does but is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// `md5` not followed by exactly 32 hex digits.
    #[error("a secret starting with \"md5\" must be md5 followed by 32 hex digits (write a plain password that starts with md5 as its verifier)")]
    Md5,
    /// `SCRAM-SHA-256$` not followed by `<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    #[error("a secret starting with \"SCRAM-SHA-256$\" must be SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>: {0}")]
    Scram(&'static str),
}

fn parse_scram(rest: &str) -> Result<ScramSecret, SecretError> {
    let (iter_salt, keys) = rest
        .split_once('$')
        .ok_or(SecretError::Scram("no '$' before the keys"))?;
    let (iterations, salt) = iter_salt
        .split_once(':')
        .ok_or(SecretError::Scram("no ':' between iterations and salt"))?;
    let (stored, server) = keys
        .split_once(':')
        .ok_or(SecretError::Scram("no ':' between the keys"))?;
    let key = |s: &str| -> Option<[u8; 32]> { STANDARD.decode(s).ok()?.try_into().ok() };
    Ok(ScramSecret {
        iterations: iterations
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(SecretError::Scram(
                "the iteration count is not a positive number",
            ))?,
        salt: STANDARD
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(SecretError::Scram("the salt is not base64"))?,
        stored_key: key(stored).ok_or(SecretError::Scram(
            "the StoredKey is not 32 bytes of base64",
        ))?,
        server_key: key(server).ok_or(SecretError::Scram(
            "the ServerKey is not 32 bytes of base64",
        ))?,
    })
}

/// Users and their secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Userlist {
    users: HashMap<String, Secret>,
    /// 1-based line of each user with an empty password (warned about).
    empty: Vec<(String, usize)>,
    /// SCRAM verifiers of the plain-text passwords (see [`Userlist::prepare_scram`]).
    derived: HashMap<String, ScramSecret>,
    /// See [`Userlist::mock_iterations`].
    mock_iterations: u32,
}

impl Default for Userlist {
    fn default() -> Self {
        Userlist {
            users: HashMap::new(),
            empty: Vec::new(),
            derived: HashMap::new(),
            mock_iterations: DEFAULT_ITERATIONS,
        }
    }
}

/// What is wrong with one line of the auth file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line is not `"user" "secret"`.
    #[error("expected \"user\" \"secret\"")]
    Syntax,
    /// The secret looks like a verifier but does not parse.
    #[error("user {user:?}: {error}")]
    Secret {
        /// Whose secret.
        user: String,
        /// What is wrong with it.
        error: SecretError,
    },
    /// The user was listed before.
    #[error("user {user:?} is listed twice (first on line {first})")]
    Duplicate {
        /// The user.
        user: String,
        /// The line of the first entry.
        first: usize,
    },
}

/// The auth file cannot be used. Each variant's text is complete and it has
/// no `source()`, so that a printed chain does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum UserlistError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// A line is wrong.
    #[error("{path}:{line}: {error}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        error: LineError,
    },
}

impl Userlist {
    /// Reads an auth file.
    pub fn load(path: &Path) -> Result<Userlist, UserlistError> {
        let text = std::fs::read_to_string(path).map_err(|error| UserlistError::Io {
            path: path.display().to_string(),
            error,
        })?;
        let list = Self::parse(&text).map_err(|(line, error)| UserlistError::Line {
            path: path.display().to_string(),
            line,
            error,
        })?;
        for (user, line) in &list.empty {
            tracing::warn!(
                file = %path.display(),
                line,
                user,
                "the auth file gives this user an empty password: the router refuses empty passwords, so this user cannot log in"
            );
        }
        Ok(list)
    }

    /// Parses auth file text; the error is the first bad line's number and
    /// what is wrong with it.
    pub fn parse(text: &str) -> Result<Userlist, (usize, LineError)> {
        let mut users = HashMap::new();
        let mut lines: HashMap<String, usize> = HashMap::new();
        let mut empty = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
                continue;
            }
            let (user, rest) = quoted(trimmed).ok_or((number, LineError::Syntax))?;
            let (secret, _) = quoted(rest.trim_start()).ok_or((number, LineError::Syntax))?;
            if let Some(&first) = lines.get(&user) {
                return Err((number, LineError::Duplicate { user, first }));
            }
            let secret = Secret::parse(&secret).map_err(|error| {
                (
                    number,
                    LineError::Secret {
                        user: user.clone(),
                        error,
                    },
                )
            })?;
            if secret.is_empty_password() {
                empty.push((user.clone(), number));
            }
            lines.insert(user.clone(), number);
            users.insert(user, secret);
        }
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for secret in users.values() {
            if let Secret::Scram(s) = secret {
                *counts.entry(s.iterations).or_default() += 1;
            }
        }
        let mock_iterations = counts
            .into_iter()
            .max_by_key(|&(iterations, n)| (n, std::cmp::Reverse(iterations)))
            .map_or(DEFAULT_ITERATIONS, |(iterations, _)| iterations);
        Ok(Userlist {
            users,
            empty,
            derived: HashMap::new(),
            mock_iterations,
        })
    }

    /// Derives, once, a SCRAM verifier for each plain-text password, salted
    /// with the user's mock salt and with the iteration count unknown users
    /// are shown: an exchange with a plain-text user then does the same work
    /// and shows the same kind of salt as one with an unknown user (before, a
    /// plain-text user took a PBKDF2 run, ~0.5 ms, and a new random salt at
    /// every login). Costs one PBKDF2 run per plain-text user at load time.
    pub fn prepare_scram(&mut self, key: &MockKey) {
        let iterations = self.mock_iterations;
        self.derived = self
            .users
            .iter()
            .filter_map(|(user, secret)| match secret {
                Secret::Plain(p) if !p.is_empty() => {
                    Some((user.clone(), derive(p, &key.salt(user), iterations)))
                }
                _ => None,
            })
            .collect();
    }

    /// The iteration count shown to users without a verifier of their own:
    /// the one most of the file's verifiers have, else Postgres' default.
    #[cfg(test)]
    pub fn mock_iterations(&self) -> u32 {
        self.mock_iterations
    }

    /// The verifier a SCRAM exchange with `user` runs against, and why it must
    /// fail whatever the client proves (unknown user, empty password, an md5
    /// secret that cannot serve SCRAM): such users get a mock verifier, stable
    /// per name, and fail only at the end, like a wrong password.
    pub fn scram_secret(&self, user: &str, key: &MockKey) -> (ScramSecret, Option<AuthError>) {
        // Computed for every user, used or not, so that a known user costs
        // what an unknown one does.
        let mock = key.secret(user, self.mock_iterations);
        match self.users.get(user) {
            Some(Secret::Scram(s)) => (s.clone(), None),
            Some(Secret::Plain(p)) if p.is_empty() => {
                (mock, Some(AuthError::EmptyPassword(user.to_string())))
            }
            Some(Secret::Plain(p)) => match self.derived.get(user) {
                Some(s) => (s.clone(), None),
                None => (derive(p, &mock.salt, self.mock_iterations), None),
            },
            Some(Secret::Md5(_)) => (
                mock,
                Some(AuthError::UnusableSecret(user.to_string(), "scram-sha-256")),
            ),
            None => (mock, Some(AuthError::UnknownUser(user.to_string()))),
        }
    }

    /// Under `auth.type = "md5"`, a user without a SCRAM verifier is asked for
    /// md5 and one with a verifier for SCRAM. An unknown user is asked for
    /// SCRAM only when every user of the file has a verifier, so that it looks
    /// like one of them; else for md5, as plain-text and md5 users are (a file
    /// that mixes the two kinds lets a client tell its SCRAM users apart,
    /// whatever the router does: docs/router.md says so).
    pub fn unknown_gets_scram(&self) -> bool {
        !self.users.is_empty() && self.users.values().all(|s| matches!(s, Secret::Scram(_)))
    }

    /// A user's secret.
    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    /// Number of users.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.users.len()
    }
}

/// A double-quoted string with `""` as an escaped quote; returns it and the rest.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut chars = text.strip_prefix('"')?.char_indices().peekable();
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if chars.peek().map(|&(_, n)| n) == Some('"') {
                chars.next();
                out.push('"');
            } else {
                return Some((out, &text[i + 2..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbouncer_format() {
        let list = Userlist::parse(
            "; comment\n\"alice\" \"secret\"\n\"bo\"\"b\" \"md5a3556571e93b0d20722ba62be61e8c2d\"\n\n\
             \"carol\" \"SCRAM-SHA-256$4096:c2FsdA==$3FRWcOUbdQ/6lOQH4lrTKNcfxUTcQPiYq+5Ty3KtAfE=:Z/3ihRRjULPqfmwZxOxp8L2JiS1HYw3vHp4dctt2I5U=\"\n",
        )
        .expect("parses");
        assert_eq!(list.len(), 3);
        assert_eq!(list.get("alice"), Some(&Secret::Plain("secret".into())));
        assert!(matches!(list.get("bo\"b"), Some(Secret::Md5(_))));
        match list.get("carol") {
            Some(Secret::Scram(s)) => {
                assert_eq!(s.iterations, 4096);
                assert_eq!(s.salt, b"salt");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            Userlist::parse("\"x\" \"y\"\nalice secret\n"),
            Err((2, LineError::Syntax))
        );
        assert_eq!(
            Userlist::parse("\"x\" \"unterminated\n"),
            Err((1, LineError::Syntax))
        );
    }

    #[test]
    fn secrets_that_look_like_verifiers_must_be_verifiers() {
        for (secret, error) in [
            ("md5nothex", SecretError::Md5),
            ("md5a3556571e93b0d20722ba62be61e8c2", SecretError::Md5),
            ("md5a3556571e93b0d20722ba62be61e8c2dz", SecretError::Md5),
            (
                "SCRAM-SHA-256$4096:zzz$bad:bad",
                SecretError::Scram("the salt is not base64"),
            ),
            (
                "SCRAM-SHA-256$x:c2FsdA==$a:b",
                SecretError::Scram("the iteration count is not a positive number"),
            ),
            (
                "SCRAM-SHA-256$",
                SecretError::Scram("no '$' before the keys"),
            ),
        ] {
            let text = format!("\"ok\" \"pw\"\n\"bob\" \"{secret}\"\n");
            assert_eq!(
                Userlist::parse(&text),
                Err((
                    2,
                    LineError::Secret {
                        user: "bob".into(),
                        error
                    }
                )),
                "{secret}"
            );
        }
        // Plain passwords that merely contain the markers are plain.
        let list = Userlist::parse("\"a\" \"xmd5\"\n\"b\" \"scram-sha-256$\"\n").expect("parses");
        assert_eq!(list.get("a"), Some(&Secret::Plain("xmd5".into())));
        assert_eq!(list.get("b"), Some(&Secret::Plain("scram-sha-256$".into())));
    }

    #[test]
    fn unknown_users_get_the_iteration_count_of_most_verifiers() {
        let keys = "3FRWcOUbdQ/6lOQH4lrTKNcfxUTcQPiYq+5Ty3KtAfE=:Z/3ihRRjULPqfmwZxOxp8L2JiS1HYw3vHp4dctt2I5U=";
        let list = Userlist::parse(&format!(
            "\"a\" \"SCRAM-SHA-256$10000:c2FsdA==${keys}\"\n\"b\" \"SCRAM-SHA-256$10000:c2FsdA==${keys}\"\n\"c\" \"SCRAM-SHA-256$4096:c2FsdA==${keys}\"\n\"d\" \"pw\"\n"
        ))
        .expect("parses");
        assert_eq!(list.mock_iterations(), 10_000);
        assert!(!list.unknown_gets_scram());
        let key = MockKey::generate();
        let (ghost, refusal) = list.scram_secret("ghost", &key);
        assert_eq!(ghost.iterations, 10_000);
        assert_eq!(refusal, Some(AuthError::UnknownUser("ghost".into())));
        let mut list = list;
        list.prepare_scram(&key);
        let (plain, refusal) = list.scram_secret("d", &key);
        assert_eq!((plain.iterations, refusal), (10_000, None));
        assert_eq!(plain.salt, key.salt("d"));
        assert_eq!(Userlist::default().mock_iterations(), DEFAULT_ITERATIONS);
    }

    #[test]
    fn duplicate_users_are_refused() {
        assert_eq!(
            Userlist::parse("\"bob\" \"a\"\n; c\n\"alice\" \"b\"\n\"bob\" \"c\"\n"),
            Err((
                4,
                LineError::Duplicate {
                    user: "bob".into(),
                    first: 1
                }
            ))
        );
    }

    #[test]
    fn errors_name_file_and_line_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ul.txt");
        std::fs::write(&path, "\"a\" \"pw\"\n\"b\" \"md5nothex\"\n").expect("write");
        let err = Userlist::load(&path).expect_err("malformed secret");
        let text = chain(&err);
        assert!(text.contains("ul.txt:2: user \"b\""), "{text}");
        assert_eq!(text.matches("ul.txt").count(), 1, "{text}");
        let err = Userlist::load(&dir.path().join("missing.txt")).expect_err("missing file");
        let text = chain(&err);
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }

    /// The error and its sources as anyhow's `{:#}` prints them.
    fn chain(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut next = err.source();
        while let Some(e) = next {
            text.push_str(&format!(": {e}"));
            next = e.source();
        }
        text
    }
}
