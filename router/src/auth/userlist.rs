//! The user list (`auth.file`): lines of `"user" "secret"`, PgBouncer's
//! `auth_file` format. A secret is a plain password, `md5` + 32 hex digits, or
//! a SCRAM verifier `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

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

/// The parts of a SCRAM-SHA-256 verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// SHA-256(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl Secret {
    /// Reads a secret as written in the auth file.
    pub fn parse(text: &str) -> Secret {
        if let Some(hex) = text.strip_prefix("md5") {
            if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Secret::Md5(hex.to_ascii_lowercase());
            }
        }
        if let Some(scram) = parse_scram(text) {
            return Secret::Scram(scram);
        }
        Secret::Plain(text.to_string())
    }

    /// The plain password, when the file holds one.
    pub fn plain(&self) -> Option<&str> {
        match self {
            Secret::Plain(p) => Some(p),
            _ => None,
        }
    }
}

fn parse_scram(text: &str) -> Option<ScramSecret> {
    let rest = text.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iterations, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    let key = |s: &str| -> Option<[u8; 32]> { STANDARD.decode(s).ok()?.try_into().ok() };
    Some(ScramSecret {
        iterations: iterations.parse().ok().filter(|&i| i > 0)?,
        salt: STANDARD.decode(salt).ok()?,
        stored_key: key(stored)?,
        server_key: key(server)?,
    })
}

/// Users and their secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Userlist {
    users: HashMap<String, Secret>,
}

/// A line of the auth file that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum UserlistError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line is not `"user" "secret"`.
    #[error("{path}:{line}: expected \"user\" \"secret\"")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
}

impl Userlist {
    /// Reads an auth file.
    pub fn load(path: &Path) -> Result<Userlist, UserlistError> {
        let text = std::fs::read_to_string(path).map_err(|source| UserlistError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|line| UserlistError::Syntax {
            path: path.display().to_string(),
            line,
        })
    }

    /// Parses auth file text; the error is the first bad line's number.
    pub fn parse(text: &str) -> Result<Userlist, usize> {
        let mut users = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
                continue;
            }
            let (user, rest) = quoted(trimmed).ok_or(index + 1)?;
            let (secret, _) = quoted(rest.trim_start()).ok_or(index + 1)?;
            users.insert(user, Secret::parse(&secret));
        }
        Ok(Userlist { users })
    }

    /// A user's secret.
    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// No users at all.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
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
        assert_eq!(Userlist::parse("\"x\" \"y\"\nalice secret\n"), Err(2));
        assert_eq!(Userlist::parse("\"x\" \"unterminated\n"), Err(1));
    }
}
