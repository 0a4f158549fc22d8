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
        let stored = Secret::parse(&postgres_protocol::password::md5(b"pw", "bob"));
        assert!(verify("bob", &stored, salt, theirs.as_bytes()).is_ok());
        assert!(verify("bob", &stored, salt, b"md5nope").is_err());
    }
}
