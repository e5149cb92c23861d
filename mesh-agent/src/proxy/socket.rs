//! Sockets of the node proxy: transparent listeners that accept captured connections for any
//! destination, and upstream connections that keep the original client address.
//!
//! Every socket carries `SO_MARK = PROXY_MARK`, which the capture programs never touch, so the
//! proxy's own traffic is not captured again.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::OnceLock,
};

use mesh_common::PROXY_MARK;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::keepalive::KeepaliveSettings;

/// The keepalive every upstream socket gets (listeners get theirs where they are served).
static UPSTREAM_KEEPALIVE: OnceLock<KeepaliveSettings> = OnceLock::new();

/// Sets the keepalive of upstream sockets for the life of the process (first call wins).
pub fn set_upstream_keepalive(settings: KeepaliveSettings) {
    let _ = UPSTREAM_KEEPALIVE.set(settings);
}

/// A listener on `0.0.0.0:port` that accepts connections addressed to any IP (`IP_TRANSPARENT`):
/// `bpf_sk_assign` hands it SYNs whose destination is the original one. Accepted connections
/// inherit `TCP_NODELAY` from it (no per-connection syscall).
pub fn transparent_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Connects to `destination` from `source`'s IP (a pod's address, not one of the node's), so
/// the destination sees the real client. The port is chosen by the kernel at connect time.
///
/// A pod connecting to itself through a service (hairpin) cannot be answered from its own
/// address — it would drop a packet that claims to come from itself — so that one connection
/// comes from the node instead, as kube-proxy's hairpin masquerade does.
pub async fn connect_as(source: Ipv4Addr, destination: SocketAddrV4) -> io::Result<TcpStream> {
    // Non-blocking from creation: one syscall per connection instead of three.
    let socket = Socket::new(
        Domain::IPV4,
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(keepalive) = UPSTREAM_KEEPALIVE.get() {
        keepalive.apply(&socket)?;
    }
    if source != *destination.ip() {
        socket.set_ip_transparent_v4(true)?;
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::from((source, 0)).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(SocketAddr::V4(destination)).await
}

/// Lets many connections share a source IP: the port is picked per 4-tuple at `connect`.
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid fd, option value is a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Closes with RST instead of FIN, to pass a reset on to the other side.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Socket marks and transparent sockets need CAP_NET_ADMIN; CI runs as root, so under
    /// `CI=true` a missing root fails the test instead of skipping it. A skip is written straight
    /// to stderr, past libtest's capture, so it shows even when the test passes.
    fn root(test: &str) -> bool {
        use std::io::Write as _;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        assert!(
            root || !ci,
            "{test}: SO_MARK and IP_TRANSPARENT need root, and CI=true: not skipped under CI"
        );
        if !root {
            let _ = writeln!(
                std::io::stderr().lock(),
                "==== SKIPPED: SO_MARK and IP_TRANSPARENT need root [{test}] ===="
            );
        }
        root
    }

    #[tokio::test]
    async fn connect_as_returns_a_connected_stream() {
        if !root("connect_as_returns_a_connected_stream") {
            return;
        }
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("listener");
        let SocketAddr::V4(addr) = listener.local_addr().expect("address") else {
            unreachable!("bound to IPv4");
        };
        let (stream, accepted) =
            tokio::join!(connect_as(Ipv4Addr::LOCALHOST, addr), listener.accept());
        let mut stream = stream.expect("connect");
        let (mut accepted, _) = accepted.expect("accept");
        assert_eq!(stream.peer_addr().expect("peer"), SocketAddr::V4(addr));
        stream.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
    }

    #[tokio::test]
    async fn connect_as_reports_a_refusal() {
        if !root("connect_as_reports_a_refusal") {
            return;
        }
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let error = connect_as(
            Ipv4Addr::LOCALHOST,
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        )
        .await
        .expect_err("nothing listens");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        if !root("accepted_connections_inherit_nodelay") {
            return;
        }
        let listener =
            tokio::net::TcpListener::from_std(transparent_listener(0).expect("listener"))
                .expect("tokio listener");
        let port = listener.local_addr().expect("address").port();
        let client = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (accepted, _) = accepted.expect("accept");
        assert!(
            accepted.nodelay().expect("nodelay"),
            "accepted socket lacks TCP_NODELAY"
        );
        drop(client);
    }
}
