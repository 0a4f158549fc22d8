//! Sockets: the listener (explicit backlog), socket tuning applied to every
//! client and server connection (in this one place), the room every socket
//! read is given, and the stream type that is plain TCP, TLS on either side,
//! or a server's Unix socket.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// Listen backlog; the kernel's `somaxconn` may lower it.
pub const LISTEN_BACKLOG: i32 = 4096;
/// Idle time before the first keepalive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the peer is declared dead.
const KEEPALIVE_RETRIES: u32 = 3;

/// Size of a read buffer, and what one grows by when it runs short.
pub const READ_CHUNK: usize = 16 * 1024;
/// Free room below which a read buffer grows before the next read.
const MIN_READ_ROOM: usize = READ_CHUNK / 4;

/// Makes room in `buf` for the next socket read: a chunk when less than a
/// quarter of one is free. Reserving a whole chunk before every read would
/// grow any buffer that already holds some bytes, and growing copies the
/// whole old allocation (realloc cannot know how much of it is in use).
pub fn read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_ROOM {
        if buf.capacity() == 0 {
            if let Some(spare) = SPARE.with_borrow_mut(Vec::pop) {
                *buf = spare;
                return;
            }
        }
        buf.reserve(READ_CHUNK);
    }
}

/// Empty buffers kept per thread at most, one chunk each (512 KiB).
const SPARES_PER_THREAD: usize = 32;

thread_local! {
    /// Empty one-chunk buffers that sessions gave up, for the next read that
    /// needs one on this thread (as PgBouncer keeps its I/O buffers in a
    /// slab cache): a client running one transaction after another in
    /// transaction mode gives its buffers up between transactions and would
    /// otherwise allocate them again for each one.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes `buf`'s memory away, leaving it with none: an empty buffer of one
/// chunk is kept for [`read_room`] (while the thread keeps fewer than
/// [`SPARES_PER_THREAD`]), any other is freed.
pub fn give_up(buf: &mut BytesMut) {
    let mut buf = std::mem::take(buf);
    // An emptied buffer that was read from starts further in; reclaiming
    // moves its start back (it never allocates).
    if buf.is_empty() && buf.try_reclaim(READ_CHUNK) && buf.capacity() == READ_CHUNK {
        SPARE.with_borrow_mut(|spare| {
            if spare.len() < SPARES_PER_THREAD {
                spare.push(buf);
            }
        });
    }
}

/// Binds a listener with `SO_REUSEADDR` and a large backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// How the router notices a server that went silent (`[server]`'s
/// `tcp_user_timeout_ms`, `tcp_keepalive_idle_ms`, `tcp_keepalive_interval_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// `TCP_USER_TIMEOUT`; `None` leaves the kernel's default.
    pub user_timeout: Option<Duration>,
    /// Idle time before the first keepalive probe.
    pub keepalive_idle: Duration,
    /// Time between keepalive probes.
    pub keepalive_interval: Duration,
}

impl Liveness {
    /// The settings of the configuration in force.
    pub fn of(config: &hapg_config::router::RouterConfig) -> Liveness {
        Liveness {
            user_timeout: config.server_tcp_user_timeout(),
            keepalive_idle: config.server_keepalive_idle(),
            keepalive_interval: config.server_keepalive_interval(),
        }
    }
}

/// A server socket: TCP_NODELAY, keepalives on `liveness`'s timings, and
/// `TCP_USER_TIMEOUT`. The kernel of a frozen server still acknowledges
/// data and probes (only an epoch change frees a statement held there); a
/// server powered off or cut off acknowledges nothing, and then the user
/// timeout ends the connection: after it for data sent and unacknowledged,
/// and, while a statement runs and nothing is sent, at the first probe past
/// it (Linux then ignores the probe count).
pub fn tune_server(stream: &TcpStream, liveness: &Liveness) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_nodelay(true)?;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(liveness.keepalive_idle)
            .with_interval(liveness.keepalive_interval)
            .with_retries(KEEPALIVE_RETRIES),
    )?;
    if let Some(timeout) = liveness.user_timeout {
        sock.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

/// TCP_NODELAY and keepalives, on client sockets.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    let sock = SockRef::from(stream);
    sock.set_nodelay(true)?;
    // Turns SO_KEEPALIVE on as well.
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES),
    )
}

/// A connection to a client or a server, plain or TLS.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS from a client (the router is the TLS server).
    ClientTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS to a server (the router is the TLS client).
    ServerTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// A server on this machine, through its Unix socket (`server.unix_socket_dir`).
    Local(UnixStream),
}

impl Stream {
    /// The reactor's view of the socket underneath: ready once it has been
    /// seen readable since the last read that drained it. Costs no system
    /// call; with no read pending on the stream, `cx`'s waker displaces
    /// nobody's.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Plain(s) => s.poll_read_ready(cx),
            Stream::ClientTls(s) => s.get_ref().0.poll_read_ready(cx),
            Stream::ServerTls(s) => s.get_ref().0.poll_read_ready(cx),
            Stream::Local(s) => s.poll_read_ready(cx),
        }
    }

    /// Looks at the socket underneath without reading: `Ok(0)` at end of
    /// file, `Ok(1)` when bytes wait, `WouldBlock` when none do. For TLS,
    /// the bytes are records, not yet messages.
    pub fn peek_socket(&self) -> io::Result<usize> {
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match self {
            Stream::Plain(s) => SockRef::from(s).peek(&mut probe),
            Stream::ClientTls(s) => SockRef::from(s.get_ref().0).peek(&mut probe),
            Stream::ServerTls(s) => SockRef::from(s.get_ref().0).peek(&mut probe),
            Stream::Local(s) => SockRef::from(s).peek(&mut probe),
        }
    }

    /// True when the stream carries TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::ClientTls(_) | Stream::ServerTls(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ClientTls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::ServerTls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Local(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_flush(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_flush(cx),
            Stream::Local(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ClientTls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::ServerTls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Local(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ClientTls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::ServerTls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::Local(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn server_sockets_have_the_configured_user_timeout_and_keepalive() {
        let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.expect("connect");
        drop(accepted);
        let liveness = Liveness {
            user_timeout: Some(Duration::from_millis(4_500)),
            keepalive_idle: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
        };
        tune_server(&client, &liveness).expect("tune");
        let sock = SockRef::from(&client);
        assert!(sock.nodelay().expect("TCP_NODELAY"));
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(Duration::from_millis(4_500))
        );
        assert_eq!(
            sock.keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(2)
        );
        assert_eq!(
            sock.keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(1)
        );
    }

    #[tokio::test]
    async fn tuned_sockets_have_nodelay_and_keepalive_with_its_timings() {
        let listener = bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = listener.local_addr().expect("local address");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.expect("connect");
        let (server, _) = accepted.expect("accept");
        for stream in [&client, &server] {
            tune(stream).expect("tune");
            let sock = SockRef::from(stream);
            assert!(sock.nodelay().expect("TCP_NODELAY"));
            assert!(sock.keepalive().expect("SO_KEEPALIVE"));
            assert_eq!(sock.keepalive_time().expect("TCP_KEEPIDLE"), KEEPALIVE_IDLE);
            assert_eq!(
                sock.keepalive_interval().expect("TCP_KEEPINTVL"),
                KEEPALIVE_INTERVAL
            );
            assert_eq!(
                sock.keepalive_retries().expect("TCP_KEEPCNT"),
                KEEPALIVE_RETRIES
            );
        }
    }
}
