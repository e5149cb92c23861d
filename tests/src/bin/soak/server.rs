//! The echo server, as its own process in the server pod (`soak serve`): the soak's client
//! sockets and the server's would not fit in one process's open-files limit where it cannot be
//! raised past 20,000, and a real server is another process anyway. It counts every byte it
//! reads and writes back; the soak asks for the counts over its stdin and stdout.
//!
//! Protocol: the server prints `ready` once it listens; each `report` line on its stdin is
//! answered by one JSON line of [`Report`]; at EOF on stdin (the soak gone) it exits.

use std::{
    process::{ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Pod, Server};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines},
    net::{TcpListener, TcpStream},
    process::{Child, ChildStdin, ChildStdout},
};

/// Largest read: twice the biggest chunk, so a reply usually takes one write.
const BUF: usize = 2048;
/// How long the server may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The listen backlog (the kernel caps it at `net.core.somaxconn`, 4,096 in a new namespace).
/// The destination node's agent connects upstream as fast as the streams arrive; with the
/// usual 128, a burst overflows the accept queue, the kernel falls back to SYN cookies and
/// those connections reach the server only with their first data segment.
const BACKLOG: i32 = 4096;

/// What the echo server carried so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub accepted: usize,
    pub received: u64,
    pub written: u64,
    /// Connections that ended with the client's EOF, answered by the server's.
    pub closed_clean: usize,
    pub errors: usize,
}

impl Report {
    fn to_json(self, first_errors: &[String]) -> String {
        serde_json::json!({
            "accepted": self.accepted,
            "received": self.received,
            "written": self.written,
            "closed_clean": self.closed_clean,
            "errors": self.errors,
            "first_errors": first_errors,
        })
        .to_string()
    }

    /// The counts, and the first few error messages.
    fn from_json(line: &str) -> Result<(Self, Vec<String>)> {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("echo server report {line:?}"))?;
        let number = |key: &str| {
            v[key]
                .as_u64()
                .with_context(|| format!("no {key} in {line:?}"))
        };
        let report = Self {
            accepted: number("accepted")? as usize,
            received: number("received")?,
            written: number("written")?,
            closed_clean: number("closed_clean")? as usize,
            errors: number("errors")? as usize,
        };
        let errors = v["first_errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok((report, errors))
    }

    /// What was carried since `earlier`.
    pub fn since(self, earlier: Report) -> Report {
        Report {
            accepted: self.accepted - earlier.accepted,
            received: self.received - earlier.received,
            written: self.written - earlier.written,
            closed_clean: self.closed_clean - earlier.closed_clean,
            errors: self.errors - earlier.errors,
        }
    }
}

/// The running server process; dropping it kills it.
pub struct EchoProcess {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl EchoProcess {
    /// Starts `soak serve <port>` in `pod` and waits until it listens.
    pub async fn start(pod: &Pod, port: u16) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the soak binary")?;
        let mut child = tokio::process::Command::from(pod.netns().command(&exe.to_string_lossy()))
            .arg("serve")
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the echo server in {}", pod.id()))?;
        let stdin = child.stdin.take().context("the server's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the server's stdout")?).lines();
        let mut server = Self {
            _child: child,
            stdin,
            stdout,
        };
        let first = server.line().await?;
        if first != "ready" {
            bail!(
                "the echo server in {} said {first:?} instead of ready",
                pod.id()
            );
        }
        Ok(server)
    }

    /// The server's counts now, and its first error messages.
    pub async fn report(&mut self) -> Result<(Report, Vec<String>)> {
        self.stdin
            .write_all(b"report\n")
            .await
            .context("asking the echo server")?;
        Report::from_json(&self.line().await?)
    }

    async fn line(&mut self) -> Result<String> {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => Ok(line),
            Ok(Ok(None)) => bail!("the echo server exited"),
            Ok(Err(e)) => Err(e).context("reading from the echo server"),
            Err(_) => bail!("the echo server did not answer within {ANSWER_TIMEOUT:?}"),
        }
    }
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    written: AtomicU64,
    closed_clean: AtomicUsize,
}

/// `soak serve <port>`: runs in the server pod until its stdin closes.
pub async fn serve(port: &str) -> ExitCode {
    match serve_until_eof(port).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_until_eof(port: &str) -> Result<()> {
    let port: u16 = port.parse().with_context(|| format!("bad port {port:?}"))?;
    let listener = listen(port).with_context(|| format!("listening on port {port}"))?;
    let counters = Arc::new(Counters::default());
    let server = {
        let counters = counters.clone();
        Server::custom(listener, move |stream, _| echo(stream, counters.clone()))
    };
    let mut out = tokio::io::stdout();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let mut requests = BufReader::new(tokio::io::stdin()).lines();
    while let Some(request) = requests.next_line().await? {
        if request.trim() != "report" {
            bail!("unknown request {request:?}");
        }
        let errors = server.errors();
        let report = Report {
            accepted: server.accepted(),
            received: counters.received.load(Ordering::SeqCst),
            written: counters.written.load(Ordering::SeqCst),
            closed_clean: counters.closed_clean.load(Ordering::SeqCst),
            errors: errors.len(),
        };
        let first: Vec<String> = errors.into_iter().take(10).collect();
        out.write_all(format!("{}\n", report.to_json(&first)).as_bytes())
            .await?;
        out.flush().await?;
    }
    Ok(())
}

fn listen(port: u16) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

async fn echo(mut stream: TcpStream, counters: Arc<Counters>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = [0u8; BUF];
    loop {
        let n = stream.read(&mut buf).await.context("reading")?;
        if n == 0 {
            break;
        }
        counters.received.fetch_add(n as u64, Ordering::SeqCst);
        stream.write_all(&buf[..n]).await.context("echoing")?;
        counters.written.fetch_add(n as u64, Ordering::SeqCst);
    }
    stream
        .shutdown()
        .await
        .context("closing after the client's EOF")?;
    counters.closed_clean.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_survives_its_line() {
        let report = Report {
            accepted: 3,
            received: 10,
            written: 9,
            closed_clean: 2,
            errors: 1,
        };
        let (back, errors) = Report::from_json(&report.to_json(&["x: reset".into()])).unwrap();
        assert_eq!(back, report);
        assert_eq!(errors, ["x: reset"]);
    }
}
