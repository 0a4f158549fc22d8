//! MD5 password authentication (AuthenticationMD5Password): the client answers
//! `md5` + hex(md5(hex(md5(password + user)) + salt)).

use md5::{Digest, Md5};

use super::{AuthError, Secret};

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = String::with_capacity(32);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The answer a client holding `secret` gives to `salt`.
pub fn expected(user: &str, secret: &Secret, salt: [u8; 4]) -> Result<String, AuthError> {
    let inner = match secret {
        Secret::Plain(password) => hex_md5(&[password.as_bytes(), user.as_bytes()]),
        Secret::Md5(hex) => hex.clone(),
        Secret::Scram(_) => return Err(AuthError::UnusableSecret(user.to_string(), "md5")),
    };
    Ok(format!("md5{}", hex_md5(&[inner.as_bytes(), &salt])))
}

/// Checks a PasswordMessage's content against the secret.
pub fn verify(user: &str, secret: &Secret, salt: [u8; 4], answer: &[u8]) -> Result<(), AuthError> {
    let expected = expected(user, secret, salt)?;
    if constant_time_eq(expected.as_bytes(), answer) {
        Ok(())
    } else {
        Err(AuthError::WrongPassword(user.to_string()))
    }
}

/// Checks an md5 answer from `user`, who may be absent from the auth file or
/// have an empty password: those are refused, after the same hashing and
/// comparison against a mock secret, so that they take as long as a wrong
/// password does.
pub fn check(
    user: &str,
    secret: Option<&Secret>,
    salt: [u8; 4],
    answer: &[u8],
) -> Result<(), AuthError> {
    let mock = Secret::Md5("0".repeat(32));
    let (against, refusal) = match secret {
        None => (&mock, Some(AuthError::UnknownUser(user.to_string()))),
        Some(s) if s.is_empty_password() => {
            (&mock, Some(AuthError::EmptyPassword(user.to_string())))
        }
        Some(s) => (s, None),
    };
    let verdict = verify(user, against, salt, answer);
    match refusal {
        Some(refusal) => Err(refusal),
        None => verdict,
    }
}

/// Compares without stopping at the first difference.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgres_protocol() {
        let salt = [1, 2, 3, 4];
        let theirs = postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt);
        assert_eq!(
            expected("bob", &Secret::Plain("pw".into()), salt).expect("md5"),
            theirs
        );
        let stored =
            Secret::parse(&postgres_protocol::password::md5(b"pw", "bob")).expect("verifier");
        assert!(verify("bob", &stored, salt, theirs.as_bytes()).is_ok());
        assert!(verify("bob", &stored, salt, b"md5nope").is_err());
    }

    #[test]
    fn empty_passwords_and_unknown_users_are_refused() {
        let salt = [1, 2, 3, 4];
        let empty = postgres_protocol::authentication::md5_hash(b"bob", b"", salt);
        assert_eq!(
            check(
                "bob",
                Some(&Secret::Plain(String::new())),
                salt,
                empty.as_bytes()
            ),
            Err(AuthError::EmptyPassword("bob".into()))
        );
        assert_eq!(
            check("bob", None, salt, empty.as_bytes()),
            Err(AuthError::UnknownUser("bob".into()))
        );
        let pw = postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt);
        assert!(check(
            "bob",
            Some(&Secret::Plain("pw".into())),
            salt,
            pw.as_bytes()
        )
        .is_ok());
    }
}
