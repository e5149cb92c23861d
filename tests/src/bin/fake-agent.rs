//! A stand-in for `mesh-agent` with the same process contract and nothing else, so the harness's
//! agent handling (readiness, logs, signals, CLI) is tested without the real agent:
//! `fake-agent run --node <name> --state <dir> [--exit-after-ms N] [--never-ready]` serves
//! `GET /healthz/ready` on 127.0.0.1:15021 and exits 0 on SIGTERM; `fake-agent status` prints JSON.

use std::{env, process::ExitCode, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        Some("run") => {}
        Some("status") => {
            println!("{{\"agent\":\"fake\",\"args\":{:?}}}", args.join(" "));
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("fake-agent: unknown command {args:?}");
            return ExitCode::from(2);
        }
    }
    let node = flag("--node").unwrap_or_default();
    let state = flag("--state").unwrap_or_default();
    let ready = !args.iter().any(|a| a == "--never-ready");
    let exit_after = flag("--exit-after-ms")
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    if exit_after == Some(Duration::ZERO) {
        // Exit before serving anything: racing a 0 ms timer against the first readiness
        // request made the harness test flaky.
        println!("fake-agent giving up");
        return ExitCode::from(3);
    }
    let listener = match TcpListener::bind("127.0.0.1:15021").await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-agent: bind 127.0.0.1:15021: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("fake-agent started node={node} state={state}");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let exit_timer = async {
        match exit_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(exit_timer);
    loop {
        tokio::select! {
            _ = term.recv() => {
                println!("fake-agent draining: SIGTERM");
                return ExitCode::SUCCESS;
            }
            _ = &mut exit_timer => {
                println!("fake-agent giving up");
                return ExitCode::from(3);
            }
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let ok = ready && request.starts_with("GET /healthz/ready ");
                    let (status, body) = if ok { ("200 OK", "ready\n") } else { ("503 Service Unavailable", "not ready\n") };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        }
    }
}
