//! Finding peers that are gone: TCP keepalive (and a user timeout) on every proxied socket,
//! HTTP/2 PING on every tunnel, and an idle timeout for connections that carry nothing.

use std::{
    future::poll_fn,
    io,
    os::fd::AsFd,
    sync::atomic::{AtomicBool, Ordering},
    task::Poll,
    time::Duration,
};

use futures::task::AtomicWaker;
use h2::{Ping, PingPong};
use serde::Serialize;
use socket2::{SockRef, TcpKeepalive};

/// How quickly a peer that vanished is noticed, and how long a silent connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeepaliveSettings {
    /// Quiet time on a socket before TCP keepalive probes start.
    #[serde(with = "crate::config::secs")]
    pub tcp_time: Duration,
    #[serde(with = "crate::config::secs")]
    pub tcp_interval: Duration,
    /// Unanswered probes before the kernel resets the connection.
    pub tcp_probes: u32,
    /// A tunnel PINGs its peer this long after the last answer...
    #[serde(with = "crate::config::secs")]
    pub http2_interval: Duration,
    /// ...and is closed, with every stream on it, when no PONG comes within this.
    #[serde(with = "crate::config::secs")]
    pub http2_timeout: Duration,
    /// A connection that carried no byte either way for this long is closed (both legs).
    #[serde(with = "crate::config::secs")]
    pub idle_timeout: Duration,
}

impl Default for KeepaliveSettings {
    fn default() -> Self {
        Self {
            tcp_time: Duration::from_secs(60),
            tcp_interval: Duration::from_secs(10),
            tcp_probes: 6,
            http2_interval: Duration::from_secs(30),
            http2_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

impl KeepaliveSettings {
    /// How long unacknowledged data may wait before the kernel gives the connection up
    /// (`TCP_USER_TIMEOUT`): as long as keepalive takes to give up on a silent peer. Without it a
    /// peer that vanished while data was in flight holds the socket for ~15 minutes of
    /// retransmissions, which keepalive does not cut short.
    fn user_timeout(&self) -> Duration {
        self.tcp_time + self.tcp_interval * self.tcp_probes
    }

    /// Sets keepalive and the user timeout on a socket. On a listener it is set once: the
    /// sockets it accepts inherit it, so the accepting path pays nothing per connection.
    pub fn apply(&self, socket: impl AsFd) -> io::Result<()> {
        let socket = SockRef::from(&socket);
        let keepalive = TcpKeepalive::new()
            .with_time(self.tcp_time)
            .with_interval(self.tcp_interval)
            .with_retries(self.tcp_probes);
        socket.set_tcp_keepalive(&keepalive)?;
        socket.set_tcp_user_timeout(Some(self.user_timeout()))
    }
}

/// Resolves when the tunnel's peer has left a PING unanswered for the HTTP/2 timeout; PINGs
/// go out one interval after the previous answer. Never resolves without pings (`None`: the
/// connection's pings were taken) or with a zero interval (keepalive off).
pub async fn unanswered(ping_pong: Option<PingPong>, settings: KeepaliveSettings) {
    let KeepaliveSettings {
        http2_interval: interval,
        http2_timeout: timeout,
        ..
    } = settings;
    let Some(mut ping_pong) = ping_pong.filter(|_| !interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection failed: its own future reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// The signal that cuts one idle connection: set by the connection table's sweep, awaited by
/// the connection's forwarding (a flag and a waker, so each wake-up of the forwarding costs an
/// atomic check, not a lock).
#[derive(Debug, Default)]
pub struct Cut {
    cut: AtomicBool,
    waker: AtomicWaker,
}

impl Cut {
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Resolves once [`Cut::cut`] was called.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.cut.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.cut.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// The error a connection cut for idleness ends with.
pub fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle timeout: no bytes either way")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_cut_wakes_the_waiting_connection() {
        let cut = Arc::new(Cut::default());
        let waiting = tokio::spawn({
            let cut = cut.clone();
            async move { cut.wait().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        cut.cut();
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the cut did not wake the connection")
            .unwrap();
    }

    #[test]
    fn keepalive_is_set_on_the_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let settings = KeepaliveSettings {
            tcp_time: Duration::from_secs(7),
            tcp_interval: Duration::from_secs(3),
            tcp_probes: 4,
            ..KeepaliveSettings::default()
        };
        settings.apply(&listener).unwrap();
        let socket = SockRef::from(&listener);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(3)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(19))
        );
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_keepalive() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        KeepaliveSettings::default().apply(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let socket = SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(120))
        );
    }
}
