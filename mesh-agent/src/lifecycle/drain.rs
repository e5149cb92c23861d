//! The end of a drain: connections still open are reset, not closed.
//!
//! When the drain period is over the process exits, and the kernel would close each socket with
//! a FIN — or with a reset when unread data happens to be queued. A FIN tells the application
//! that its peer finished, which for a cut-off stream is a lie it may act on (a truncated
//! download taken as complete). So every TCP connection the process still holds gets
//! `SO_LINGER` 0 first: each one ends with a reset, and the application sees
//! `ECONNRESET`, as it would if the connection broke. Listening sockets are left alone (a
//! successor may share them).

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
};

/// Sets `SO_LINGER` 0 on every connected TCP socket of this process; returns how many.
pub fn reset_open_connections() -> io::Result<usize> {
    let mut reset = 0;
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the fd is only used for the calls below while this loop runs; the directory
        // listing's own fd (also listed) fails the socket checks harmlessly.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if reset_if_connected(fd) {
            reset += 1;
        }
    }
    Ok(reset)
}

/// `SO_LINGER` 0 on `fd` when it is a connected TCP socket; true when it was set.
fn reset_if_connected(fd: BorrowedFd<'_>) -> bool {
    is_connected_tcp(fd) && set_linger_zero(fd)
}

fn is_connected_tcp(fd: BorrowedFd<'_>) -> bool {
    let int = |level, name| -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid fd (borrowed), a c_int buffer with its length.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    int(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && matches!(
            int(libc::SOL_SOCKET, libc::SO_DOMAIN),
            Some(libc::AF_INET | libc::AF_INET6)
        )
        && int(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(0)
}

fn set_linger_zero(fd: BorrowedFd<'_>) -> bool {
    socket2::SockRef::from(&fd)
        .set_linger(Some(std::time::Duration::ZERO))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read},
        net::{TcpListener, TcpStream, UdpSocket},
        os::fd::AsFd,
    };

    use super::*;

    #[test]
    fn open_connections_end_with_a_reset() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let ours = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (mut theirs, _) = listener.accept().expect("accept");
        // Not the whole process: other tests of this binary run alongside.
        assert!(reset_if_connected(ours.as_fd()));
        assert!(
            !reset_if_connected(listener.as_fd()),
            "a listener is left alone"
        );
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert!(!reset_if_connected(udp.as_fd()), "not TCP");
        drop(ours);
        let mut buf = [0u8; 8];
        let error = theirs
            .read(&mut buf)
            .expect_err("the peer sees a reset, not EOF");
        assert_eq!(error.kind(), ErrorKind::ConnectionReset);
        // The listener was left alone: it still accepts.
        let _again = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        listener.accept().expect("accept after the reset");
    }
}
