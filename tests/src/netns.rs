//! One named network namespace (`ip netns add`): running commands and creating sockets inside it.
//!
//! Sockets are created by a worker thread that has `setns`-ed into the namespace for good; a
//! socket keeps the namespace it was created in, so everything after creation (connect, bind,
//! I/O) runs on tokio as usual. Commands get the namespace the same way, in `pre_exec`: only the
//! network namespace changes. `ip netns exec` would also remount `/sys` in a private mount
//! namespace, which hides `/sys/fs/bpf` and the cgroup2 mount the agent and `bpftool` need.

use std::{
    ffi::CString,
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, mpsc},
    thread,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{
    command::{self, COMMAND_TIMEOUT},
    traffic::{self, CONNECT_TIMEOUT, HttpResponse},
};

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

type Job = Box<dyn FnOnce() + Send>;

struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: thread::JoinHandle<()>,
}

/// A network namespace created by [`Netns::create`] and deleted on drop.
pub struct Netns {
    name: String,
    path: PathBuf,
    worker: Mutex<Option<Worker>>,
}

impl Netns {
    /// `ip netns add <name>`, then brings `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        command::stdout_of(
            Command::new("ip").args(["netns", "add", name]),
            COMMAND_TIMEOUT,
        )?;
        let netns = Netns {
            name: name.to_owned(),
            path: Path::new(NETNS_DIR).join(name),
            worker: Mutex::new(None),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a thread inside this namespace and returns its result (blocks the caller;
    /// meant for short work such as creating a socket or writing a sysctl).
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let jobs = self.jobs()?;
        let (tx, rx) = mpsc::sync_channel(1);
        jobs.send(Box::new(move || {
            let _ = tx.send(f());
        }))
        .map_err(|_| anyhow!("netns {} worker is gone", self.name))?;
        rx.recv()
            .map_err(|_| anyhow!("netns {} worker dropped a job", self.name))
    }

    /// A command that runs inside this namespace (network namespace only; mounts stay the host's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let path = CString::new(self.path.as_os_str().as_bytes()).expect("netns path has no NUL");
        // SAFETY: the hook runs between fork and exec and only makes async-signal-safe
        // syscalls (open, setns, close) on memory allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let rc = libc::setns(fd, libc::CLONE_NEWNET);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if rc != 0 {
                    return Err(err);
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `args[0] args[1..]` inside this namespace; returns stdout, or an error with stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        self.exec_with_timeout(args, COMMAND_TIMEOUT)
    }

    pub fn exec_with_timeout(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let (program, rest) = args.split_first().context("exec needs a program")?;
        command::stdout_of(self.command(program).args(rest), timeout)
            .with_context(|| format!("in netns {}", self.name))
    }

    /// `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        command::stdout_of(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// Writes `/proc/sys/<key with dots as slashes>` as seen from this namespace,
    /// e.g. `sysctl("net.ipv4.ip_forward", "1")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_owned();
        let shown = path.clone();
        self.run(move || std::fs::write(&path, value))?
            .with_context(|| format!("writing {shown} in netns {}", self.name))
    }

    /// Reads a sysctl as seen from this namespace.
    pub fn sysctl_get(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let shown = path.clone();
        let value = self
            .run(move || std::fs::read_to_string(&path))?
            .with_context(|| format!("reading {shown} in netns {}", self.name))?;
        Ok(value.trim().to_owned())
    }

    /// Moves the calling thread into this namespace until the guard drops. Sockets the thread
    /// creates meanwhile live here with no hop through the worker thread, as an application's
    /// would: for loops that open many connections from a current-thread runtime (the bench).
    pub fn enter(&self) -> Result<Entered> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target =
            File::open(&self.path).with_context(|| format!("opening {}", self.path.display()))?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering netns {}", self.name))?;
        Ok(Entered {
            home,
            _not_send: std::marker::PhantomData,
        })
    }

    /// A TCP/IPv4 socket that lives in this namespace, non-blocking, not yet bound.
    pub fn tcp_socket(&self) -> Result<Socket> {
        self.run(|| -> io::Result<Socket> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })?
        .with_context(|| format!("creating a socket in netns {}", self.name))
    }

    /// Connects from this namespace to `to`, failing after [`CONNECT_TIMEOUT`].
    pub async fn connect(&self, to: SocketAddr) -> Result<TcpStream> {
        let socket = TcpSocket::from_std_stream(self.tcp_socket()?.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(e).with_context(|| format!("connect {} -> {to}", self.name)),
            Err(_) => bail!(
                "connect {} -> {to}: no answer within {CONNECT_TIMEOUT:?}",
                self.name
            ),
        }
    }

    /// A listener on `0.0.0.0:port` in this namespace.
    pub async fn listen(&self, port: u16) -> Result<TcpListener> {
        self.listen_on(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
            .await
    }

    /// A listener on `addr` in this namespace (backlog 1024, `SO_REUSEADDR`).
    pub async fn listen_on(&self, addr: SocketAddr) -> Result<TcpListener> {
        let socket = self.tcp_socket()?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&addr.into())
            .with_context(|| format!("bind {addr} in netns {}", self.name))?;
        socket.listen(1024)?;
        Ok(TcpListener::from_std(socket.into())?)
    }

    /// `GET http://<to><path>` from this namespace (HTTP/1.1, `Connection: close`).
    pub async fn http_get(&self, to: SocketAddr, path: &str) -> Result<HttpResponse> {
        let stream = self.connect(to).await?;
        traffic::http_get(stream, &to.to_string(), path).await
    }

    fn jobs(&self) -> Result<mpsc::Sender<Job>> {
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = worker.as_ref() {
            return Ok(w.jobs.clone());
        }
        let w = spawn_worker(&self.name, &self.path)?;
        let jobs = w.jobs.clone();
        *worker = Some(w);
        Ok(jobs)
    }

    /// Ends the worker thread: while it sits in the namespace, the namespace cannot go away.
    fn stop_worker(&self) {
        let worker = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Worker { jobs, thread }) = worker {
            drop(jobs);
            if thread.join().is_err() {
                warn!("mesh-tests: netns {} worker panicked", self.name);
            }
        }
    }
}

/// The calling thread's stay in a namespace ([`Netns::enter`]); dropping it goes back. Not
/// `Send`: it belongs to the thread that entered.
pub struct Entered {
    home: File,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.home, CloneFlags::CLONE_NEWNET) {
            warn!("mesh-tests: returning to the original netns failed: {e}");
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop_worker();
        match command::run(
            Command::new("ip").args(["netns", "del", &self.name]),
            COMMAND_TIMEOUT,
        ) {
            Ok(out) if out.status.success() => {}
            Ok(out) => warn!(
                "mesh-tests: `ip netns del {}` failed ({}): {}",
                self.name,
                out.status,
                out.stderr.trim_end()
            ),
            Err(e) => warn!("mesh-tests: `ip netns del {}`: {e:#}", self.name),
        }
    }
}

fn spawn_worker(name: &str, path: &Path) -> Result<Worker> {
    let (jobs, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let path = path.to_owned();
    let thread = thread::Builder::new()
        .name(format!("netns-{name}"))
        .spawn(move || {
            let entered = File::open(&path)
                .and_then(|ns| setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from));
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }
        })
        .context("spawning a netns worker thread")?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(Worker { jobs, thread }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e).with_context(|| format!("entering netns {name}"))
        }
        Err(_) => bail!("netns {name} worker died while starting"),
    }
}
