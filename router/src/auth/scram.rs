//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677) as Postgres speaks it:
//! no channel binding offered (`n` or `y` GS2 headers accepted), the user name
//! in the client's message ignored in favour of the startup user.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::md5::constant_time_eq;
use super::AuthError;

/// Iterations used when the auth file holds a plain password.
pub const DEFAULT_ITERATIONS: u32 = 4096;

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

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramSecret(i={}, ****)", self.iterations)
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// A SCRAM verifier derived from a plain password.
pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
    let mut salted = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
    let client_key = hmac(&salted, b"Client Key");
    ScramSecret {
        iterations,
        salt: salt.to_vec(),
        stored_key: Sha256::digest(client_key).into(),
        server_key: hmac(&salted, b"Server Key"),
    }
}

/// One SCRAM exchange, between the server-first and server-final messages.
pub struct ScramServer {
    user: String,
    secret: ScramSecret,
    /// Why the client will be refused whatever it proves (unknown user, empty
    /// password, unusable secret): the exchange runs to its end all the same,
    /// so that it looks and costs the same as a real user's.
    refusal: Option<AuthError>,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ScramServer {
    /// Starts an exchange from the client's SASLInitialResponse data against
    /// `secret`; returns the exchange and the server-first message. With a
    /// `refusal`, the exchange fails with it at the end.
    pub fn start(
        user: &str,
        secret: ScramSecret,
        refusal: Option<AuthError>,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), AuthError> {
        let text = std::str::from_utf8(client_first)
            .map_err(|_| AuthError::Malformed("client-first-message is not UTF-8"))?;
        let (gs2_header, bare) = split_gs2(text)?;
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(AuthError::Malformed("client-first-message has no nonce"))?;
        let mut random = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut random);
        let nonce = format!("{client_nonce}{}", STANDARD.encode(random));
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&secret.salt),
            secret.iterations
        );
        Ok((
            ScramServer {
                user: user.to_string(),
                secret,
                refusal,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                gs2_header: gs2_header.to_string(),
                nonce,
            },
            server_first,
        ))
    }

    /// Checks the client-final message; returns the server-final message.
    pub fn finish(self, client_final: &[u8]) -> Result<String, AuthError> {
        let text = std::str::from_utf8(client_final)
            .map_err(|_| AuthError::Malformed("client-final-message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(AuthError::Malformed("client-final-message has no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding =
            attrs
                .next()
                .and_then(|a| a.strip_prefix("c="))
                .ok_or(AuthError::Malformed(
                    "client-final-message has no channel binding",
                ))?;
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(AuthError::Malformed("client-final-message has no nonce"))?;
        if STANDARD.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(AuthError::Malformed("channel binding does not match"));
        }
        if nonce != self.nonce {
            return Err(AuthError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(AuthError::Malformed("proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.secret.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        let matches = constant_time_eq(&stored, &self.secret.stored_key);
        if let Some(refusal) = self.refusal {
            return Err(refusal);
        }
        if !matches {
            return Err(AuthError::WrongPassword(self.user));
        }
        let server_signature = hmac(&self.secret.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)))
    }
}

fn split_gs2(text: &str) -> Result<(&str, &str), AuthError> {
    let malformed = AuthError::Malformed("bad GS2 header");
    let first = text.find(',').ok_or(malformed.clone())?;
    let second = text[first + 1..].find(',').ok_or(malformed.clone())? + first + 1;
    match &text[..first] {
        "n" | "y" => {}
        _ => return Err(AuthError::Malformed(
            "channel binding is not offered by the router (use channel_binding=disable or prefer)",
        )),
    }
    if !text[first + 1..second].is_empty() && !text[first + 1..second].starts_with("a=") {
        return Err(malformed);
    }
    Ok((&text[..=second], &text[second + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::mock::MockKey;
    use crate::auth::{Secret, Userlist};
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// A client with `password` against the user `bob` of `list`.
    fn exchange(list: &Userlist, password: &[u8]) -> Result<(), AuthError> {
        let key = MockKey::generate();
        let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
        let (secret, refusal) = list.scram_secret("bob", &key);
        let (server, first) = ScramServer::start("bob", secret, refusal, client.message())?;
        client
            .update(first.as_bytes())
            .expect("client accepts server-first");
        let last = server.finish(client.message())?;
        client
            .finish(last.as_bytes())
            .expect("client verifies the server");
        Ok(())
    }

    fn list(secret: &str) -> Userlist {
        let mut list = Userlist::parse(&format!("\"bob\" \"{secret}\"\n")).expect("parses");
        list.prepare_scram(&MockKey::generate());
        list
    }

    #[test]
    fn plain_and_verifier_secrets() {
        assert!(exchange(&list("pw"), b"pw").is_ok());
        assert!(matches!(
            exchange(&list("pw"), b"nope"),
            Err(AuthError::WrongPassword(_))
        ));
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(Secret::parse(&verifier), Ok(Secret::Scram(_))));
        assert!(exchange(&list(&verifier), b"pw").is_ok());
        assert!(exchange(&list(&verifier), b"pX").is_err());
    }

    #[test]
    fn refused_users_fail_at_the_end() {
        let md5 = postgres_protocol::password::md5(b"pw", "bob");
        for (list, password, reason) in [
            (
                Userlist::default(),
                &b"pw"[..],
                AuthError::UnknownUser("bob".into()),
            ),
            (list(""), b"", AuthError::EmptyPassword("bob".into())),
            (
                list(&md5),
                b"pw",
                AuthError::UnusableSecret("bob".into(), "scram-sha-256"),
            ),
        ] {
            assert_eq!(exchange(&list, password), Err(reason));
        }
    }

    #[test]
    fn garbage_is_refused() {
        let key = MockKey::generate();
        let secret = || key.secret("bob", 4096);
        assert!(
            ScramServer::start("bob", secret(), None, b"p=tls-server-end-point,,n=,r=abc").is_err()
        );
        assert!(ScramServer::start("bob", secret(), None, b"n,,n=").is_err());
        assert!(ScramServer::start("bob", secret(), None, b"\xff").is_err());
        let (server, _) = ScramServer::start("bob", secret(), None, b"n,,n=,r=abc").expect("start");
        assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }
}
