//! Binding the server's address again in the network namespace its first listener lived in,
//! so `up()` after `down()` works for a server started inside a node's namespace.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use socket2::{Domain, Socket, Type};

/// `SIOCGSKNS`: a file descriptor of the network namespace a socket belongs to.
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// The socket's network namespace, if it is not this thread's (or cannot be told).
pub fn of_socket(socket: &impl AsRawFd) -> Option<OwnedFd> {
    // SAFETY: the ioctl takes no argument and returns a new descriptor or -1.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSKNS as _) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let theirs = unsafe { OwnedFd::from_raw_fd(fd) };
    let ours = std::fs::metadata("/proc/thread-self/ns/net").ok()?;
    let other = std::fs::File::from(theirs.try_clone().ok()?)
        .metadata()
        .ok()?;
    use std::os::unix::fs::MetadataExt as _;
    (ours.ino() != other.ino() || ours.dev() != other.dev()).then_some(theirs)
}

/// A listener on `addr` (SO_REUSEADDR, non-blocking), made inside `netns` when given.
pub fn listen(netns: Option<&OwnedFd>, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let bind = move || -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let Some(netns) = netns else {
        return bind();
    };
    let netns = netns.try_clone()?;
    // setns affects only the calling thread: a short-lived thread enters, binds and exits.
    std::thread::spawn(move || {
        // SAFETY: netns is a valid namespace descriptor; CLONE_NEWNET only switches this thread.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        bind()
    })
    .join()
    .map_err(|_| std::io::Error::other("bind thread panicked"))?
}
