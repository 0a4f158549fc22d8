//! Client authentication at the router, as PgBouncer does it: trust, md5 or
//! SCRAM-SHA-256 against a user list in PgBouncer's `auth_file` format. The
//! exchanges here are pure (no I/O); the session drives them.

pub mod md5;
pub mod mock;
pub mod scram;
pub mod userlist;

pub use userlist::{Secret, Userlist};

/// Why a client was not let in (the client only ever learns "password
/// authentication failed", as with Postgres).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No such user in the auth file.
    #[error("user {0:?} is not in the auth file")]
    UnknownUser(String),
    /// The auth file gives the user an empty password.
    #[error("user {0:?} has an empty password in the auth file, and empty passwords are refused")]
    EmptyPassword(String),
    /// The proof or hash does not match.
    #[error("password does not match for user {0:?}")]
    WrongPassword(String),
    /// The stored secret cannot be used with the method in force.
    #[error("the auth file's secret for user {0:?} cannot be used with {1}")]
    UnusableSecret(String, &'static str),
    /// The client's messages do not follow the exchange.
    #[error("malformed authentication exchange: {0}")]
    Malformed(&'static str),
}
