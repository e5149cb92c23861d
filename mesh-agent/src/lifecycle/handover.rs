//! Listener hand-over between agent processes on one node: the running agent passes its listening
//! TCP sockets to its successor (SCM_RIGHTS over an abstract Unix socket, as Envoy's hot restart),
//! so that during an upgrade or restart no new connection is ever refused.
//!
//! Both processes hold the same listening sockets for a moment, so they share one accept queue:
//! the old one stops accepting once the new one says it is `Serving`, and whatever is queued by
//! then is accepted by the new one. The old one drains the connections it already has and exits;
//! its end of the Unix connection closing tells the successor it is gone.
//!
//! ```text
//! new → old   {"message":"hello","version":..,"pid":..}
//! old → new   {"message":"listeners","version":..,"pid":..,"names":[..]}  + SCM_RIGHTS, one fd per name
//! new → old   {"message":"serving"}                     (or {"message":"abort","reason":..})
//!             ... the connection stays open until the old process exits
//! ```
//! Messages are newline-delimited JSON. Either side may answer `abort` with a reason instead, so
//! that the other side's error says what went wrong rather than "connection closed".
//!
//! The Unix socket's name is abstract (Linux: not in the filesystem, scoped to the network
//! namespace), which is exactly the scope of one node's data plane.

use std::{
    collections::HashSet,
    fmt,
    io::{self, IoSlice, IoSliceMut},
    mem,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt,
        unix::{fs::MetadataExt, net::SocketAddr as UnixAddr},
    },
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};
use tokio::{
    io::Interest,
    net::{UnixListener, UnixStream},
    time::Instant,
};

/// The abstract Unix socket name the running agent offers its listeners on.
pub const SOCKET_NAME: &str = "mesh-agent/handover";

/// At most this many listeners change hands in one hand-over.
pub const MAX_LISTENERS: usize = 8;

/// This agent's version, told to the other side (informational: any two versions may hand over).
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A message longer than this is a protocol error (ours are a few hundred bytes).
const MAX_MESSAGE: usize = 64 * 1024;

/// How long the old side waits for a connected successor's `hello`, so a stuck peer cannot keep
/// the offer from the next one.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How often `Offer::bind` retries a name the predecessor still holds.
const BIND_RETRY: Duration = Duration::from_millis(20);

/// The kernel's limit of fds in one SCM_RIGHTS message (`SCM_MAX_FD`). The control buffer is
/// sized for it, not for `MAX_LISTENERS`: with a smaller buffer the kernel would still install
/// the fds that fit but flag MSG_CTRUNC, and nix then refuses to iterate them, so they would
/// leak. Anything beyond `MAX_LISTENERS` is refused after the fds are owned.
const SCM_MAX_FD: usize = 253;

/// `CAP_NET_ADMIN`, bit 12 of the capability sets (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket name {name:?} is not a valid abstract Unix socket name: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("hand-over socket {name:?} is still in use after waiting {waited:?}")]
    InUse { name: String, waited: Duration },
    #[error("hand-over socket: {doing}: {source}")]
    Io {
        doing: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("refusing hand-over with pid {pid}: {reason}")]
    PeerRefused { pid: u32, reason: String },
    #[error("pid {pid} aborted the hand-over: {reason}")]
    Aborted { pid: u32, reason: String },
    #[error("pid {pid} closed the hand-over connection while we waited for {waiting_for}")]
    Closed { pid: u32, waiting_for: &'static str },
    #[error("hand-over protocol error with pid {pid}: {detail}")]
    Protocol { pid: u32, detail: String },
    #[error("the hand-over did not finish within {0:?}")]
    Timeout(Duration),
    #[error("listeners expected from the predecessor: {0}")]
    InvalidExpected(String),
    #[error("the inherited listeners are not the expected ones: {}", list(.0))]
    Listeners(Vec<ListenerMismatch>),
    #[error("this offer was already taken over by pid {pid}")]
    AlreadyTaken { pid: u32 },
}

/// One listener received from the predecessor (or expected from it) that is not as expected.
#[derive(Debug)]
pub struct ListenerMismatch {
    pub name: String,
    pub problem: ListenerProblem,
}

impl fmt::Display for ListenerMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.name, self.problem)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenerProblem {
    #[error("is not a socket")]
    NotASocket,
    #[error("is not a stream socket")]
    NotStream,
    #[error("is neither IPv4 nor IPv6 (address family {0})")]
    NotInet(i32),
    #[error("is not listening")]
    NotListening,
    #[error("is bound to {actual}, not the expected {expected}")]
    Address {
        expected: SocketAddr,
        actual: String,
    },
    #[error("was sent but not expected")]
    Unexpected,
    #[error("was sent twice")]
    Duplicate,
    #[error("was expected but not sent")]
    Missing,
    #[error("cannot be inspected: {0}")]
    Unreadable(#[source] io::Error),
}

fn list(mismatches: &[ListenerMismatch]) -> String {
    mismatches
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn io_error(doing: &'static str) -> impl FnOnce(io::Error) -> HandoverError {
    move |source| HandoverError::Io { doing, source }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "message", rename_all = "snake_case")]
enum Message {
    Hello {
        version: String,
        pid: u32,
        /// The node's hand-over token, read from the pinned data plane (see [`Offer::bind`]).
        #[serde(default)]
        token: String,
    },
    Listeners {
        version: String,
        pid: u32,
        names: Vec<String>,
    },
    Serving {},
    Abort {
        reason: String,
    },
}

impl Message {
    fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Listeners { .. } => "listeners",
            Message::Serving {} => "serving",
            Message::Abort { .. } => "abort",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The new side.

/// What the new process got from the old.
#[derive(Debug)]
pub struct Inherited {
    /// In the order the old process sent them. They share their open file description with the
    /// old process, so file status flags are shared too: set them non-blocking (tokio needs it,
    /// and the old process's tokio relies on it), never blocking.
    pub listeners: Vec<(String, std::net::TcpListener)>,
    pub previous: Previous,
}

/// The old process, as seen by its successor.
#[derive(Debug)]
pub struct Previous {
    /// As SO_PEERCRED reports it, i.e. in our pid namespace.
    pub pid: u32,
    pub version: String,
    connection: Connection,
    served: bool,
}

impl Previous {
    /// Tells the old process that we accept on its listeners now; it stops accepting.
    /// Calling it again does nothing.
    pub async fn serving(&mut self) -> Result<(), HandoverError> {
        if !self.served {
            self.connection
                .send(&Message::Serving {}, &[])
                .await
                .map_err(io_error("sending serving"))?;
            self.served = true;
        }
        Ok(())
    }

    /// Resolves when the old process has exited (its end of the connection closed). Dropping a
    /// `Previous` without `serving()` tells the old process that we gave up.
    pub async fn exited(mut self) {
        self.connection.closed().await
    }
}

/// Asks the agent serving this network namespace for its listeners. Ok(None) when no agent answers
/// (nothing bound to the name: ECONNREFUSED). `expected`: name → local address each listener must
/// have; the names sent must be exactly these. Bounded by `timeout` overall (the connect, the peer
/// check and receiving the listeners; not what the caller does afterwards).
pub async fn take_over(
    socket_name: &str,
    expected: &[(&str, SocketAddr)],
    timeout: Duration,
    token: &str,
) -> Result<Option<Inherited>, HandoverError> {
    take_over_with(socket_name, expected, timeout, token, PeerRule::AGENT).await
}

async fn take_over_with(
    socket_name: &str,
    expected: &[(&str, SocketAddr)],
    timeout: Duration,
    token: &str,
    rule: PeerRule,
) -> Result<Option<Inherited>, HandoverError> {
    let address = abstract_address(socket_name)?;
    check_expected(expected)?;
    // Dropping the future on timeout drops whatever fds were received so far.
    tokio::time::timeout(timeout, take_over_inner(&address, expected, token, rule))
        .await
        .unwrap_or(Err(HandoverError::Timeout(timeout)))
}

async fn take_over_inner(
    address: &UnixAddr,
    expected: &[(&str, SocketAddr)],
    token: &str,
    rule: PeerRule,
) -> Result<Option<Inherited>, HandoverError> {
    let stream = match UnixStream::connect_addr(&address.clone().into()).await {
        Ok(stream) => stream,
        // No agent in this network namespace: a first start, or the old one is gone already.
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(error) => return Err(io_error("connecting")(error)),
    };
    // Check the old process before telling it anything; a refused one just sees us hang up.
    let pid = check_peer(&stream, rule)?;
    let mut connection = Connection::new(stream);
    connection
        .send(
            &Message::Hello {
                version: VERSION.to_owned(),
                pid: std::process::id(),
                token: token.to_owned(),
            },
            &[],
        )
        .await
        .map_err(io_error("sending hello"))?;

    let (message, fds) = connection
        .receive(pid)
        .await?
        .ok_or(HandoverError::Closed {
            pid,
            waiting_for: "its listeners",
        })?;
    let (version, names) = match message {
        Message::Listeners { version, names, .. } => (version, names),
        Message::Abort { reason } => return Err(HandoverError::Aborted { pid, reason }),
        other => {
            return Err(HandoverError::Protocol {
                pid,
                detail: format!("{} where listeners were expected", other.kind()),
            });
        }
    };
    if names.len() != fds.len() {
        return Err(HandoverError::Protocol {
            pid,
            detail: format!("{} listener names but {} fds", names.len(), fds.len()),
        });
    }

    let mismatches = check_listeners(&names, &fds, expected);
    if !mismatches.is_empty() {
        let error = HandoverError::Listeners(mismatches);
        // Best effort: the old side's error then says why; it carries on serving either way.
        let reason = error.to_string();
        let _ = connection.send(&Message::Abort { reason }, &[]).await;
        return Err(error);
    }
    tracing::debug!(pid, %version, listeners=?names, component="handover", "inherited the listeners");
    let listeners = names
        .into_iter()
        .zip(fds)
        .map(|(name, fd)| (name, std::net::TcpListener::from(fd)))
        .collect();
    Ok(Some(Inherited {
        listeners,
        previous: Previous {
            pid,
            version,
            connection,
            served: false,
        },
    }))
}

/// The caller's list must make sense before we ask anyone.
fn check_expected(expected: &[(&str, SocketAddr)]) -> Result<(), HandoverError> {
    if expected.len() > MAX_LISTENERS {
        return Err(HandoverError::InvalidExpected(format!(
            "{} listeners, at most {MAX_LISTENERS} can be handed over",
            expected.len()
        )));
    }
    let mut seen = HashSet::new();
    for (name, _) in expected {
        if !seen.insert(*name) {
            return Err(HandoverError::InvalidExpected(format!(
                "{name:?} is listed twice"
            )));
        }
    }
    Ok(())
}

/// Every received listener against the expected ones; all mismatches, not only the first.
fn check_listeners(
    names: &[String],
    fds: &[OwnedFd],
    expected: &[(&str, SocketAddr)],
) -> Vec<ListenerMismatch> {
    let mut mismatches = Vec::new();
    let mut seen = HashSet::new();
    for (name, fd) in names.iter().zip(fds) {
        let problem = if !seen.insert(name.as_str()) {
            Some(ListenerProblem::Duplicate)
        } else {
            match expected.iter().find(|(wanted, _)| wanted == name) {
                None => Some(ListenerProblem::Unexpected),
                Some((_, address)) => check_listener(fd.as_fd(), *address).err(),
            }
        };
        if let Some(problem) = problem {
            mismatches.push(ListenerMismatch {
                name: name.clone(),
                problem,
            });
        }
    }
    for (name, _) in expected {
        if !seen.contains(name) {
            mismatches.push(ListenerMismatch {
                name: (*name).to_owned(),
                problem: ListenerProblem::Missing,
            });
        }
    }
    mismatches
}

/// A listening TCP socket (IPv4 or IPv6) bound to `expected`.
fn check_listener(fd: BorrowedFd<'_>, expected: SocketAddr) -> Result<(), ListenerProblem> {
    let socket = socket2::SockRef::from(&fd);
    let kind = socket.r#type().map_err(|error| {
        if error.raw_os_error() == Some(libc::ENOTSOCK) {
            ListenerProblem::NotASocket
        } else {
            ListenerProblem::Unreadable(error)
        }
    })?;
    if kind != socket2::Type::STREAM {
        return Err(ListenerProblem::NotStream);
    }
    let domain = socket.domain().map_err(ListenerProblem::Unreadable)?;
    if domain != socket2::Domain::IPV4 && domain != socket2::Domain::IPV6 {
        return Err(ListenerProblem::NotInet(domain.into()));
    }
    if !socket.is_listener().map_err(ListenerProblem::Unreadable)? {
        return Err(ListenerProblem::NotListening);
    }
    let local = socket.local_addr().map_err(ListenerProblem::Unreadable)?;
    match local.as_socket() {
        Some(actual) if actual == expected => Ok(()),
        actual => Err(ListenerProblem::Address {
            expected,
            actual: actual.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string()),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The old side.

/// The old side: offers this process's listeners to a successor.
///
/// `next` can be called again after a failed attempt; after a successful one the Unix listener is
/// closed (so the successor can bind the name for its own successor) and `next` returns
/// `AlreadyTaken`. Dropping a `next` future is safe: the Offer stays usable and the successor in
/// flight, if any, sees the connection close.
#[derive(Debug)]
pub struct Offer {
    name: String,
    state: OfferState,
    rule: PeerRule,
    token: String,
}

#[derive(Debug)]
enum OfferState {
    Open(UnixListener),
    Taken { pid: u32 },
}

impl Offer {
    /// Binds the abstract name. A predecessor may still hold it for a moment after our `serving()`:
    /// retry EADDRINUSE for up to `wait` (every 20 ms), then fail.
    ///
    /// `token`: what a successor must present. The agent keeps it in the pinned data plane, which
    /// only a process that may change the data plane itself can read (root with CAP_BPF and the
    /// node's bpffs). Two agent pods do not share a pid namespace, so the peer's capabilities
    /// cannot be read from /proc there; the token vouches for it instead.
    pub async fn bind(
        socket_name: &str,
        wait: Duration,
        token: String,
    ) -> Result<Offer, HandoverError> {
        Self::bind_with(socket_name, wait, token, PeerRule::AGENT).await
    }

    async fn bind_with(
        socket_name: &str,
        wait: Duration,
        token: String,
        rule: PeerRule,
    ) -> Result<Offer, HandoverError> {
        let address = abstract_address(socket_name)?;
        let deadline = Instant::now() + wait;
        let listener = loop {
            match std::os::unix::net::UnixListener::bind_addr(&address) {
                Ok(listener) => break listener,
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                    if Instant::now() >= deadline {
                        return Err(HandoverError::InUse {
                            name: socket_name.to_owned(),
                            waited: wait,
                        });
                    }
                    tokio::time::sleep(BIND_RETRY).await;
                }
                Err(error) => return Err(io_error("binding")(error)),
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(io_error("binding"))?;
        let listener = UnixListener::from_std(listener).map_err(io_error("binding"))?;
        Ok(Offer {
            name: socket_name.to_owned(),
            state: OfferState::Open(listener),
            rule,
            token,
        })
    }

    /// The abstract socket name this offer is bound to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for a successor, checks it, sends it `listeners` (name, fd) and waits for its Serving.
    /// A successor that fails the peer check or goes away before Serving is an error for this
    /// attempt only: the caller logs it and calls `next` again. On success the Unix listener is
    /// closed (so the successor can bind the name) and the connection is returned; the caller
    /// then stops accepting (the queue is shared, nothing queued is lost) and drains.
    ///
    /// Waiting for Serving is not bounded: until it comes this process keeps serving, and the
    /// successor decides when it is ready (a dead one closes the connection, which ends the wait).
    pub async fn next(
        &mut self,
        listeners: &[(&str, BorrowedFd<'_>)],
    ) -> Result<Successor, HandoverError> {
        let unix = match &self.state {
            OfferState::Open(unix) => unix,
            OfferState::Taken { pid } => return Err(HandoverError::AlreadyTaken { pid: *pid }),
        };
        if listeners.len() > MAX_LISTENERS {
            return Err(HandoverError::InvalidExpected(format!(
                "{} listeners offered, at most {MAX_LISTENERS} can be handed over",
                listeners.len()
            )));
        }
        let (stream, _) = unix.accept().await.map_err(io_error("accepting"))?;
        let successor = offer_to(stream, listeners, &self.token, self.rule).await?;
        tracing::debug!(pid=successor.pid, version=%successor.version, component="handover", "successor serving");
        // Closing the listener frees the name for the successor's own Offer.
        self.state = OfferState::Taken { pid: successor.pid };
        Ok(successor)
    }
}

async fn offer_to(
    stream: UnixStream,
    listeners: &[(&str, BorrowedFd<'_>)],
    token: &str,
    rule: PeerRule,
) -> Result<Successor, HandoverError> {
    // The pid for error messages until the peer check has vouched for it.
    let claimed = stream
        .peer_cred()
        .ok()
        .and_then(|cred| cred.pid())
        .and_then(|pid| u32::try_from(pid).ok())
        .unwrap_or(0);
    let mut connection = Connection::new(stream);
    // Read the hello before judging the peer: closing a Unix stream with unread data resets it,
    // and the peer could then miss our abort.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, connection.receive(claimed))
        .await
        .map_err(|_| HandoverError::Timeout(HELLO_TIMEOUT))??;
    let (message, fds) = hello.ok_or(HandoverError::Closed {
        pid: claimed,
        waiting_for: "its hello",
    })?;
    let (version, presented) = match message {
        Message::Hello { version, token, .. } if fds.is_empty() => (version, token),
        other => {
            return Err(HandoverError::Protocol {
                pid: claimed,
                detail: format!(
                    "{} (with {} fds) where hello was expected",
                    other.kind(),
                    fds.len()
                ),
            });
        }
    };
    let checked = check_peer(&connection.stream, rule).and_then(|pid| {
        if same_token(&presented, token) {
            Ok(pid)
        } else {
            Err(HandoverError::PeerRefused {
                pid,
                reason: "it does not present this node's hand-over token (kept in the pinned data plane)"
                    .to_owned(),
            })
        }
    });
    let pid = match checked {
        Ok(pid) => pid,
        Err(error) => {
            // Best effort: a legitimate but misdeployed successor then logs why.
            let reason = error.to_string();
            let _ = connection.send(&Message::Abort { reason }, &[]).await;
            return Err(error);
        }
    };

    let (names, fds): (Vec<String>, Vec<BorrowedFd<'_>>) = listeners
        .iter()
        .map(|(name, fd)| ((*name).to_owned(), *fd))
        .unzip();
    let message = Message::Listeners {
        version: VERSION.to_owned(),
        pid: std::process::id(),
        names,
    };
    connection
        .send(&message, &fds)
        .await
        .map_err(io_error("sending the listeners"))?;

    match connection.receive(pid).await? {
        Some((Message::Serving {}, _)) => Ok(Successor {
            pid,
            version,
            connection,
        }),
        Some((Message::Abort { reason }, _)) => Err(HandoverError::Aborted { pid, reason }),
        Some((other, _)) => Err(HandoverError::Protocol {
            pid,
            detail: format!("{} where serving was expected", other.kind()),
        }),
        None => Err(HandoverError::Closed {
            pid,
            waiting_for: "serving",
        }),
    }
}

/// The new process, as seen by the old one; dropping it (at exit) tells the successor we are gone.
#[derive(Debug)]
pub struct Successor {
    /// As SO_PEERCRED reports it, i.e. in our pid namespace.
    pub pid: u32,
    pub version: String,
    connection: Connection,
}

impl Successor {
    /// Resolves when the successor has exited (its end of the connection closed): the caller may
    /// then resume accepting on the listeners it still holds, if it has not exited yet.
    pub async fn exited(&mut self) {
        self.connection.closed().await
    }
}

// ---------------------------------------------------------------------------------------------
// Peer check.

/// What a peer must have to take part. A process receiving the proxy's listeners gets all
/// captured traffic, so only one that could already do as much may: same effective uid, same user
/// namespace, and these effective capabilities.
#[derive(Debug, Clone, Copy)]
struct PeerRule {
    capabilities: u64,
}

impl PeerRule {
    const AGENT: PeerRule = PeerRule {
        capabilities: 1 << CAP_NET_ADMIN,
    };
}

/// The peer's pid (in our pid namespace) if it passes `rule`, from SO_PEERCRED (the peer's
/// credentials when it connected or listened) and its /proc entries. The pid could in theory be
/// recycled between its connect and our reading /proc; a recycled pid would have to belong to a
/// process passing the same check, so this does not let anyone less privileged in.
fn check_peer(stream: &UnixStream, rule: PeerRule) -> Result<u32, HandoverError> {
    let cred = stream
        .peer_cred()
        .map_err(io_error("reading the peer's credentials (SO_PEERCRED)"))?;
    let pid = cred
        .pid()
        .and_then(|pid| u32::try_from(pid).ok())
        .unwrap_or(0);
    let refuse = |reason: String| HandoverError::PeerRefused { pid, reason };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if cred.uid() != euid {
        return Err(refuse(format!(
            "its effective uid {} is not ours ({euid})",
            cred.uid()
        )));
    }
    if pid == 0 {
        // Two agent pods see each other's socket (same network namespace) but not each other's
        // pid (their own pid namespaces): its /proc cannot be read, and the token it presents
        // has to vouch for it (see `Offer::bind`).
        return Ok(0);
    }
    let ours = user_namespace("/proc/self/ns/user")
        .map_err(|error| refuse(format!("cannot read our user namespace: {error}")))?;
    let theirs = user_namespace(&format!("/proc/{pid}/ns/user"))
        .map_err(|error| refuse(format!("cannot read its user namespace: {error}")))?;
    if ours != theirs {
        return Err(refuse("it is in another user namespace".to_owned()));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|error| refuse(format!("cannot read /proc/{pid}/status: {error}")))?;
    let effective = parse_cap_eff(&status)
        .ok_or_else(|| refuse(format!("no readable CapEff in /proc/{pid}/status")))?;
    let missing = rule.capabilities & !effective;
    if missing != 0 {
        return Err(refuse(format!(
            "it lacks {} in its effective capabilities",
            capability_names(missing)
        )));
    }
    Ok(pid)
}

/// Compares tokens without stopping at the first difference.
fn same_token(presented: &str, expected: &str) -> bool {
    presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// A namespace's identity: the device and inode of its nsfs file.
fn user_namespace(path: &str) -> io::Result<(u64, u64)> {
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}

/// The effective capability set from the text of `/proc/<pid>/status` (`CapEff:\t000001ffffffffff`).
fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

fn capability_names(set: u64) -> String {
    (0..64)
        .filter(|bit| set & (1 << bit) != 0)
        .map(|bit| match bit {
            CAP_NET_ADMIN => "CAP_NET_ADMIN".to_owned(),
            other => format!("capability {other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Transport.

fn abstract_address(name: &str) -> Result<UnixAddr, HandoverError> {
    let invalid = |reason: String| HandoverError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    // An empty abstract name would make bind autobind a random one.
    if name.is_empty() {
        return Err(invalid("empty".to_owned()));
    }
    UnixAddr::from_abstract_name(name.as_bytes()).map_err(|error| invalid(error.to_string()))
}

/// One hand-over connection: newline-delimited JSON, with fds passed alongside as SCM_RIGHTS.
/// Everything is read with recvmsg, so fds sent with any message are received and owned (and
/// closed if unwanted). Fds belong to the message completed next; each side sends one message
/// and waits for the answer, so no two messages travel together.
#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    /// Bytes received beyond the last message returned.
    buffer: Vec<u8>,
    /// Fds received with them.
    fds: Vec<OwnedFd>,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buffer: Vec::new(),
            fds: Vec::new(),
        }
    }

    async fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
        bytes.push(b'\n');
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut sent = 0;
        while sent < bytes.len() {
            let n = self
                .stream
                .async_io(Interest::WRITABLE, || {
                    let iov = [IoSlice::new(&bytes[sent..])];
                    // The fds go with the first byte; a partial write has sent them already.
                    let rights = [ControlMessage::ScmRights(&raw)];
                    let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
                        &rights
                    } else {
                        &[]
                    };
                    // MSG_NOSIGNAL: a successor that died is an EPIPE, not a SIGPIPE.
                    sendmsg::<()>(
                        self.stream.as_raw_fd(),
                        &iov,
                        cmsgs,
                        MsgFlags::MSG_NOSIGNAL,
                        None,
                    )
                    .map_err(io::Error::from)
                })
                .await?;
            sent += n;
        }
        Ok(())
    }

    /// The next message and the fds that came with it; None when the peer closed the connection
    /// between messages.
    async fn receive(
        &mut self,
        pid: u32,
    ) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoverError> {
        let protocol = |detail: String| HandoverError::Protocol { pid, detail };
        loop {
            if let Some(end) = self.buffer.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let fds = mem::take(&mut self.fds);
                let message = serde_json::from_slice(&line[..end])
                    .map_err(|error| protocol(format!("unreadable message: {error}")))?;
                return Ok(Some((message, fds)));
            }
            if self.buffer.len() > MAX_MESSAGE {
                return Err(protocol(format!(
                    "a message longer than {MAX_MESSAGE} bytes"
                )));
            }
            if self.fds.len() > MAX_LISTENERS {
                return Err(protocol(format!(
                    "{} fds, at most {MAX_LISTENERS} are accepted",
                    self.fds.len()
                )));
            }
            match self.fill().await {
                Ok(0) if self.buffer.is_empty() => return Ok(None),
                Ok(0) => return Err(protocol("the connection closed mid-message".to_owned())),
                Ok(_) => {}
                // A peer that exits with our message unread resets the connection: it is gone.
                Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(error) => return Err(io_error("receiving")(error)),
            }
        }
    }

    /// One recvmsg: appends the bytes to `buffer` and the fds to `fds`. Ok(0) at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 4096];
        let mut control = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let stream = &self.stream;
        let (n, fds, truncated) = stream
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                // MSG_CMSG_CLOEXEC: no child we spawn ever inherits a listener by accident.
                let received = recvmsg::<()>(
                    stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut control),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                if let Ok(cmsgs) = received.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            // SAFETY: the kernel has just installed these fds in our table for
                            // us; nothing else refers to them, so each is owned exactly once.
                            fds.extend(
                                raw.into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                }
                let truncated = received.flags.contains(MsgFlags::MSG_CTRUNC);
                Ok((received.bytes, fds, truncated))
            })
            .await?;
        self.buffer.extend_from_slice(&chunk[..n]);
        self.fds.extend(fds);
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control data truncated (more fds than SCM_MAX_FD?)",
            ));
        }
        Ok(n)
    }

    /// Resolves when the peer's end is closed (or the connection fails, which means the same).
    async fn closed(&mut self) {
        loop {
            match self.fill().await {
                Ok(0) | Err(_) => return,
                // The protocol has nothing more to say; whatever comes is dropped, fds closed.
                Ok(_) => {
                    self.buffer.clear();
                    self.fds.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        future::Future,
        net::TcpListener,
        os::fd::AsFd,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;

    const STEP: Duration = Duration::from_secs(5);
    const TOKEN: &str = "5f0c2a9e4b7d1c38";

    /// Every await in these tests is bounded: a bug fails them rather than hanging them.
    async fn within<F: Future>(future: F) -> F::Output {
        tokio::time::timeout(STEP, future).await.expect("timed out")
    }

    fn unique_name() -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!(
            "mesh-agent-test/handover/{}/{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The agent's rule where we have CAP_NET_ADMIN ourselves (root); without it (an unprivileged
    /// test run) only uid and user namespace are checked, so the tests run either way.
    fn test_rule() -> PeerRule {
        let ours = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| parse_cap_eff(&status))
            .unwrap_or(0);
        PeerRule {
            capabilities: ours & PeerRule::AGENT.capabilities,
        }
    }

    fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    #[tokio::test]
    async fn round_trip() {
        let name = unique_name();
        let (inbound, inbound_address) = listener();
        let (outbound, outbound_address) = listener();
        let mut offer = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), test_rule()))
            .await
            .unwrap();
        // The name is ours while the offer is open.
        let busy = Offer::bind_with(
            &name,
            Duration::from_millis(50),
            TOKEN.to_owned(),
            test_rule(),
        )
        .await;
        assert!(matches!(busy, Err(HandoverError::InUse { .. })), "{busy:?}");

        let old = tokio::spawn(async move {
            let successor = offer
                .next(&[("inbound", inbound.as_fd()), ("outbound", outbound.as_fd())])
                .await;
            (offer, successor, inbound, outbound)
        });
        let expected = [("outbound", outbound_address), ("inbound", inbound_address)];
        let inherited = within(take_over_with(&name, &expected, STEP, TOKEN, test_rule()))
            .await
            .unwrap()
            .expect("an agent answers");
        let Inherited {
            listeners,
            mut previous,
        } = inherited;
        assert_eq!(previous.pid, std::process::id());
        assert_eq!(previous.version, VERSION);
        let addresses: Vec<_> = listeners
            .iter()
            .map(|(name, listener)| (name.as_str(), listener.local_addr().unwrap()))
            .collect();
        assert_eq!(
            addresses,
            [("inbound", inbound_address), ("outbound", outbound_address)]
        );

        within(previous.serving()).await.unwrap();
        let (mut offer, successor, inbound, outbound) = within(old).await.unwrap();
        let successor = successor.unwrap();
        assert_eq!(successor.pid, std::process::id());
        assert_eq!(successor.version, VERSION);
        let again = offer.next(&[]).await;
        assert!(
            matches!(again, Err(HandoverError::AlreadyTaken { .. })),
            "{again:?}"
        );
        // The old process closed its Unix listener: the successor can offer in turn.
        let _own = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), test_rule()))
            .await
            .unwrap();

        // The old process's sockets go away; the inherited ones still accept.
        drop((inbound, outbound));
        let (_, inherited) = listeners
            .into_iter()
            .find(|(name, _)| name == "inbound")
            .unwrap();
        inherited.set_nonblocking(true).unwrap();
        let inherited = tokio::net::TcpListener::from_std(inherited).unwrap();
        let client = tokio::spawn(tokio::net::TcpStream::connect(inbound_address));
        let (_accepted, peer) = within(inherited.accept()).await.unwrap();
        let client = within(client).await.unwrap().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());

        // The predecessor is "draining" until its connection closes.
        let exited = tokio::spawn(previous.exited());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!exited.is_finished(), "exited before the old side closed");
        drop(successor);
        within(exited).await.unwrap();
    }

    #[tokio::test]
    async fn nobody_to_take_over_from() {
        let started = std::time::Instant::now();
        let inherited = within(take_over(&unique_name(), &[], STEP, TOKEN))
            .await
            .unwrap();
        assert!(inherited.is_none());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn mismatch_is_refused_and_the_offer_stays_usable() {
        let name = unique_name();
        let (inbound, inbound_address) = listener();
        let (_other, other_address) = listener();
        let dns = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dns_address = dns.local_addr().unwrap();
        let mut offer = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), test_rule()))
            .await
            .unwrap();

        let old = tokio::spawn(async move {
            let first = offer
                .next(&[("inbound", inbound.as_fd()), ("dns", dns.as_fd())])
                .await;
            let second = offer.next(&[("inbound", inbound.as_fd())]).await;
            (first, second)
        });

        let expected = [
            ("inbound", other_address),
            ("dns", dns_address),
            ("admin", other_address),
        ];
        let refused = within(take_over_with(&name, &expected, STEP, TOKEN, test_rule())).await;
        let Err(HandoverError::Listeners(mismatches)) = &refused else {
            panic!("{refused:?}")
        };
        let problems: Vec<_> = mismatches
            .iter()
            .map(|mismatch| (mismatch.name.as_str(), &mismatch.problem))
            .collect();
        assert!(
            matches!(
                problems[..],
                [
                    ("inbound", ListenerProblem::Address { .. }),
                    ("dns", ListenerProblem::NotStream),
                    ("admin", ListenerProblem::Missing),
                ]
            ),
            "{problems:?}"
        );
        let message = refused.unwrap_err().to_string();
        assert!(
            message.contains("\"inbound\" is bound to 127.0.0.1:"),
            "{message}"
        );

        // A correct successor still gets the listeners from the same offer.
        let mut inherited = within(take_over_with(
            &name,
            &[("inbound", inbound_address)],
            STEP,
            TOKEN,
            test_rule(),
        ))
        .await
        .unwrap()
        .unwrap();
        within(inherited.previous.serving()).await.unwrap();

        let (first, second) = within(old).await.unwrap();
        match first {
            Err(HandoverError::Aborted { pid, reason }) => {
                assert_eq!(pid, std::process::id());
                assert!(reason.contains("\"inbound\""), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(second.is_ok(), "{second:?}");
    }

    #[tokio::test]
    async fn successor_gone_before_serving() {
        let name = unique_name();
        let (inbound, inbound_address) = listener();
        let mut offer = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), test_rule()))
            .await
            .unwrap();
        let old = tokio::spawn(async move {
            let first = offer.next(&[("inbound", inbound.as_fd())]).await;
            let second = offer.next(&[("inbound", inbound.as_fd())]).await;
            (first, second)
        });
        let expected = [("inbound", inbound_address)];

        // A successor that dies after getting the listeners: its end closes.
        let inherited = within(take_over_with(&name, &expected, STEP, TOKEN, test_rule()))
            .await
            .unwrap()
            .unwrap();
        drop(inherited);

        let mut inherited = within(take_over_with(&name, &expected, STEP, TOKEN, test_rule()))
            .await
            .unwrap()
            .unwrap();
        within(inherited.previous.serving()).await.unwrap();
        let (first, second) = within(old).await.unwrap();
        assert!(
            matches!(
                first,
                Err(HandoverError::Closed {
                    waiting_for: "serving",
                    ..
                })
            ),
            "{first:?}"
        );
        assert!(second.is_ok(), "{second:?}");
    }

    #[tokio::test]
    async fn a_successor_without_the_token_is_refused() {
        let name = unique_name();
        let (inbound, inbound_address) = listener();
        let expected = [("inbound", inbound_address)];
        let mut offer = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), test_rule()))
            .await
            .unwrap();
        let old = tokio::spawn(async move {
            let refusal = offer.next(&[("inbound", inbound.as_fd())]).await;
            (offer, inbound, refusal)
        });
        let refused = within(take_over_with(
            &name,
            &expected,
            STEP,
            "not-the-token",
            test_rule(),
        ))
        .await;
        assert!(
            matches!(&refused, Err(HandoverError::Aborted { reason, .. }) if reason.contains("hand-over token")),
            "{refused:?}"
        );
        let (mut offer, inbound, refusal) = within(old).await.unwrap();
        assert!(
            matches!(&refusal, Err(HandoverError::PeerRefused { reason, .. }) if reason.contains("hand-over token")),
            "{refusal:?}"
        );
        // The offer stays usable for the real successor.
        let old = tokio::spawn(async move { offer.next(&[("inbound", inbound.as_fd())]).await });
        let mut inherited = within(take_over_with(&name, &expected, STEP, TOKEN, test_rule()))
            .await
            .unwrap()
            .unwrap();
        within(inherited.previous.serving()).await.unwrap();
        within(old).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn peer_without_the_capabilities_is_refused() {
        // No process has capability 63: both sides refuse the other, with the reason.
        let impossible = PeerRule {
            capabilities: 1 << 63,
        };
        let name = unique_name();
        let (inbound, inbound_address) = listener();
        let expected = [("inbound", inbound_address)];

        let mut offer = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), impossible))
            .await
            .unwrap();
        let old = tokio::spawn(async move { offer.next(&[("inbound", inbound.as_fd())]).await });
        let refused = within(take_over_with(&name, &expected, STEP, TOKEN, test_rule())).await;
        assert!(
            matches!(&refused, Err(HandoverError::Aborted { reason, .. }) if reason.contains("capability 63")),
            "{refused:?}"
        );
        let refusal = within(old).await.unwrap();
        assert!(
            matches!(&refusal, Err(HandoverError::PeerRefused { pid, .. }) if *pid == std::process::id()),
            "{refusal:?}"
        );

        let name = unique_name();
        let (inbound, _) = listener();
        let mut offer = within(Offer::bind_with(&name, STEP, TOKEN.to_owned(), test_rule()))
            .await
            .unwrap();
        let old = tokio::spawn(async move { offer.next(&[("inbound", inbound.as_fd())]).await });
        let refused = within(take_over_with(&name, &expected, STEP, TOKEN, impossible)).await;
        assert!(
            matches!(&refused, Err(HandoverError::PeerRefused { .. })),
            "{refused:?}"
        );
        let gone = within(old).await.unwrap();
        assert!(
            matches!(
                gone,
                Err(HandoverError::Closed {
                    waiting_for: "its hello",
                    ..
                })
            ),
            "{gone:?}"
        );
    }

    #[tokio::test]
    async fn agent_rule_wants_cap_net_admin() {
        // The production rule against ourselves: passes exactly when we have CAP_NET_ADMIN.
        let name = unique_name();
        let (inbound, inbound_address) = listener();
        let mut offer = within(Offer::bind(&name, STEP, TOKEN.to_owned()))
            .await
            .unwrap();
        let old = tokio::spawn(async move { offer.next(&[("inbound", inbound.as_fd())]).await });
        let result = within(take_over(
            &name,
            &[("inbound", inbound_address)],
            STEP,
            TOKEN,
        ))
        .await;
        if test_rule().capabilities == 0 {
            assert!(
                matches!(&result, Err(HandoverError::PeerRefused { reason, .. }) if reason.contains("CAP_NET_ADMIN")),
                "{result:?}"
            );
            // We refused it before saying hello.
            assert!(within(old).await.unwrap().is_err());
        } else {
            let mut inherited = result.unwrap().unwrap();
            within(inherited.previous.serving()).await.unwrap();
            assert!(within(old).await.unwrap().is_ok());
        }
    }

    #[test]
    fn cap_eff_parsing() {
        let status = "Name:\tmesh-agent\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000000001000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(1 << CAP_NET_ADMIN));
        assert_eq!(
            parse_cap_eff("CapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(parse_cap_eff("CapPrm:\t0000000000001000\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tnot hex\n"), None);
        assert_eq!(
            capability_names(1 << CAP_NET_ADMIN | 1 << 21),
            "CAP_NET_ADMIN, capability 21"
        );
    }
}
