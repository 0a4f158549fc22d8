//! What the router shows a client it will not let in, so that it cannot tell
//! which users exist (as Postgres' `scram_mock_salt` does): a SCRAM salt
//! derived from the user name and a key drawn at startup, so that it is the
//! same at every attempt, as a real user's is; the same iteration count as
//! the file's verifiers; and a verifier to run the same exchange against.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use super::scram::ScramSecret;

/// Bytes of a mock salt: what Postgres uses (`SCRAM_DEFAULT_SALT_LEN`).
pub const SALT_LEN: usize = 16;

/// The router's key for mock secrets: random, drawn once per process and kept
/// across reloads, so a name's mock salt never changes while the router runs.
pub struct MockKey([u8; 32]);

impl MockKey {
    /// Draws a new key.
    pub fn generate() -> MockKey {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        MockKey(key)
    }

    fn mac(&self, purpose: &[u8], user: &str) -> [u8; 32] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(purpose);
        mac.update(&[0]);
        mac.update(user.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The salt for `user`: also the salt of the verifier derived from a
    /// plain-text password, so a plain-text user and an unknown one look alike.
    pub fn salt(&self, user: &str) -> Vec<u8> {
        self.mac(b"salt", user)[..SALT_LEN].to_vec()
    }

    /// A verifier nobody knows the password of, stable for `user`.
    pub fn secret(&self, user: &str, iterations: u32) -> ScramSecret {
        ScramSecret {
            iterations,
            salt: self.salt(user),
            stored_key: self.mac(b"stored key", user),
            server_key: self.mac(b"server key", user),
        }
    }
}

impl std::fmt::Debug for MockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockKey(****)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_per_name_and_key() {
        let key = MockKey::generate();
        assert_eq!(key.salt("ghost"), key.salt("ghost"));
        assert_ne!(key.salt("ghost"), key.salt("ghost2"));
        assert_eq!(key.salt("ghost").len(), SALT_LEN);
        assert_ne!(MockKey::generate().salt("ghost"), key.salt("ghost"));
        assert_eq!(key.secret("ghost", 4096), key.secret("ghost", 4096));
    }
}
