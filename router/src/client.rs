//! The client side of a connection ([`ClientConn`]): its stream and
//! buffers, and the ways a session ends on it.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client_error::ClientError;
use crate::net::{self, Stream};
use crate::protocol::backend::sqlstate;
use crate::protocol::frame;

/// The largest message a client may send before it has logged in (a
/// PasswordMessage, SASLInitialResponse or SASLResponse), counted as its length
/// field counts it: Postgres 15's `PG_MAX_AUTH_TOKEN_LENGTH`, the limit its
/// `recv_password_packet` and SASL exchange give `pq_getmessage`. An md5 answer
/// is 36 bytes and a SCRAM message a few hundred, so no client needs more;
/// a client gets no more of the router's memory than this before it has
/// proved who it is. (The startup packet has its own limit,
/// [`startup::MAX_STARTUP_LEN`], Postgres' `MAX_STARTUP_PACKET_LENGTH`.)
const MAX_AUTH_MESSAGE: usize = 65_535;

/// How long a refused client that has not logged in may go on sending before
/// the router closes (see [`ClientConn::refuse`]).
const REFUSE_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The client side of a connection: stream, read buffer and write buffer.
pub(crate) struct ClientConn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub max: usize,
}

/// The session ended (already reported to the client when it could be).
pub(crate) struct Ended;

impl ClientConn {
    pub async fn read_more(&mut self) -> Result<(), Ended> {
        net::read_room(&mut self.rbuf);
        match self.stream.read_buf(&mut self.rbuf).await {
            Ok(0) | Err(_) => Err(Ended),
            Ok(_) => Ok(()),
        }
    }

    pub async fn flush(&mut self) -> Result<(), Ended> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        result.map_err(|_| Ended)
    }

    /// Sends `error` (a FATAL) and closes.
    pub async fn end_with(&mut self, error: ClientError) -> Ended {
        error.write(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        Ended
    }

    /// Refuses a client that has not logged in: sends a FATAL, then reads and
    /// discards what the client is still sending, for at most
    /// [`REFUSE_DRAIN`], before closing. Closing with unread bytes makes the
    /// kernel reset the connection, and a reset can cost a client still
    /// writing a large message the reason it was about to read (Linux over
    /// loopback keeps it readable; other stacks and lost segments may not).
    /// The discarding reads into a small fixed buffer, so it costs no memory.
    pub async fn refuse(&mut self, error: ClientError) -> Ended {
        error.write(&mut self.wbuf);
        if self.flush().await.is_err() {
            return Ended;
        }
        let _ = self.stream.shutdown().await;
        self.rbuf = BytesMut::new();
        let mut sink = vec![0u8; 8192];
        let _ = tokio::time::timeout(REFUSE_DRAIN, async {
            while let Ok(n) = self.stream.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        Ended
    }

    /// Reads one tagged message during authentication, at most
    /// [`MAX_AUTH_MESSAGE`] bytes: the limit is checked on the header, so a
    /// client that announces more is refused before anything is buffered.
    pub async fn read_frame(&mut self) -> Result<(u8, BytesMut), Ended> {
        loop {
            match frame::split(&mut self.rbuf, MAX_AUTH_MESSAGE + 1) {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => self.read_more().await?,
                Err(e) => {
                    return Err(self
                        .refuse(ClientError::fatal(
                            sqlstate::PROTOCOL_VIOLATION,
                            format!("invalid authentication message: {e}"),
                            None,
                        ))
                        .await)
                }
            }
        }
    }
}
