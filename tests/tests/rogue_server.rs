//! End to end, as root: a rogue TLS server answers on a remote pod's tunnel port (15008)
//! and the agent must refuse it. Only node 0 runs an agent, so nothing on node 1 captures and
//! web-2's address:15008 reaches a server this test runs inside web-2's pod. web-1 (enrolled,
//! node 0) connects to web-2:8080; node 0's agent tunnels to web-2:15008 and has to refuse a
//! server certificate that is expired, not yet valid, of another identity or from an untrusted
//! CA — in the handshake, before any HTTP/2 — and reset web-1's connection. A control case
//! (the right certificate) shows the rogue server really is what the agent reaches.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use common::{
    Exchanged, Outcome,
    certs::{self, Leaf, Validity},
};
use mesh_tests::{Cluster, ClusterSpec};
use rustls::{AlertDescription, ServerConfig};
use tokio::{net::TcpListener, sync::mpsc};

/// web-2's identity, which node 0's agent expects at web-2:15008.
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// A valid identity of the cluster, but not web-2's.
const BATCH: &str = "spiffe://cluster.local/ns/legacy/sa/batch";
/// What node 0's agent logs when a tunnel cannot be opened.
const TUNNEL_FAILED: &str = "tunnel failed";
/// A refusal is decided in the handshake: well before the agent's 10 s handshake timeout.
const RESET_DEADLINE: Duration = Duration::from_secs(5);
/// Ceiling for anything that follows from what already happened (a log line, a counter).
const SETTLE: Duration = Duration::from_secs(10);

/// What one connection to the rogue server came to.
#[derive(Debug)]
enum Event {
    /// The TLS handshake failed: the alert the client sent, or the error as text.
    Refused(Result<AlertDescription, String>),
    /// The handshake completed and an HTTP/2 request arrived: method, authority, `Forwarded`.
    Request {
        method: http::Method,
        authority: String,
        forwarded: String,
    },
    /// The handshake completed but no HTTP/2 request followed.
    NoRequest(String),
}

/// A TLS 1.3 server with ALPN h2 presenting `cert` and asking for no client certificate.
fn rogue_config(cert: Leaf) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert.0, cert.1)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The rogue server: one listener whose certificate each case replaces, reporting what each
/// connection came to; a request that arrives is answered 200 and its body echoed.
struct Rogue {
    config: Arc<Mutex<Arc<ServerConfig>>>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Rogue {
    fn serve(listener: TcpListener, cert: Leaf) -> Result<Rogue> {
        let config = Arc::new(Mutex::new(rogue_config(cert)?));
        let (events, received) = mpsc::unbounded_channel();
        let current = config.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let config = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let events = events.clone();
                tokio::spawn(async move {
                    let _ = events.send(connection(tcp, config).await);
                });
            }
        });
        Ok(Rogue {
            config,
            events: received,
        })
    }

    /// From now on, connections are served with `cert`.
    fn present(&self, cert: Leaf) -> Result<()> {
        *self.config.lock().unwrap_or_else(|e| e.into_inner()) = rogue_config(cert)?;
        Ok(())
    }

    /// What the next connection came to.
    async fn next(&mut self, case: &str) -> Result<Event> {
        tokio::time::timeout(SETTLE, self.events.recv())
            .await
            .with_context(|| format!("{case}: the rogue server saw no connection"))?
            .context("rogue server gone")
    }
}

async fn connection(tcp: tokio::net::TcpStream, config: Arc<ServerConfig>) -> Event {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let tls = match tokio::time::timeout(SETTLE, accept).await {
        Err(_) => return Event::Refused(Err("handshake timed out".into())),
        Ok(Err(e)) => return Event::Refused(certs::alert_received(&e).ok_or(e.to_string())),
        Ok(Ok(tls)) => tls,
    };
    let mut h2 = match h2::server::handshake(tls).await {
        Ok(h2) => h2,
        Err(e) => return Event::NoRequest(format!("HTTP/2 handshake: {e}")),
    };
    let (request, mut respond) = match h2.accept().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Event::NoRequest(format!("HTTP/2: {e}")),
        None => return Event::NoRequest("closed before a request".into()),
    };
    let event = Event::Request {
        method: request.method().clone(),
        authority: request
            .uri()
            .authority()
            .map(ToString::to_string)
            .unwrap_or_default(),
        forwarded: request
            .headers()
            .get("forwarded")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
    };
    // Echo the stream's bytes while the connection is driven below.
    let mut body = request.into_body();
    if let Ok(mut send) = respond.send_response(http::Response::new(()), false) {
        tokio::spawn(async move {
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
                if send.send_data(data, false).is_err() {
                    break;
                }
            }
        });
    }
    tokio::spawn(async move { while let Some(Ok(_)) = h2.accept().await {} });
    event
}

/// Node 0's count of tunnels it could not open because of the TLS handshake.
async fn tls_failures(cluster: &Cluster) -> Result<u64> {
    let metrics = common::metrics(cluster, 0).await?;
    let sample = "mesh_agent_connection_failures_total{reporter=\"source\",listener=\"outbound\",reason=\"tls handshake\"} ";
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample))
        .map(str::parse)
        .transpose()?
        .unwrap_or(0))
}

/// Node 0's total of failed connections (`mesh-agent connections`).
fn failed_total(cluster: &Cluster) -> Result<u64> {
    cluster.cli_json(0, &["connections", "-o", "json"])?["totals"]["failed"]
        .as_u64()
        .context("no totals.failed in connections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_rogue_server_on_the_tunnel_port() -> Result<()> {
    if !mesh_tests::require_root() {
        return Ok(());
    }
    let cluster = Cluster::new(ClusterSpec::shop_and_legacy())?;
    cluster.write_state()?;
    let mut agent = cluster.start_agent(0).await?;
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let target = web2.addr(common::PORT);
    let ca = certs::cluster_ca(&cluster.ca_dir())?;
    // Starts with the control's certificate; every case presents its own.
    let mut rogue = Rogue::serve(
        web2.listen(15008).await?,
        certs::leaf(WEB, &ca, Validity::Current)?,
    )?;

    let refused: [(&str, Leaf, AlertDescription, String); 4] = [
        (
            "web-2's identity, expired",
            certs::leaf(WEB, &ca, Validity::Expired)?,
            AlertDescription::CertificateExpired,
            "certificate expired".into(),
        ),
        (
            "web-2's identity, not yet valid",
            certs::leaf(WEB, &ca, Validity::NotYetValid)?,
            AlertDescription::CertificateExpired,
            "certificate not valid yet".into(),
        ),
        (
            "another identity of the cluster",
            certs::leaf(BATCH, &ca, Validity::Current)?,
            AlertDescription::CertificateUnknown,
            format!("identity mismatch: got {BATCH}, expected {WEB}"),
        ),
        (
            "web-2's identity from an untrusted CA",
            certs::leaf(WEB, &certs::untrusted_ca()?, Validity::Current)?,
            AlertDescription::UnknownCA,
            "UnknownIssuer".into(),
        ),
    ];
    for (n, (case, cert, alert, reason)) in refused.into_iter().enumerate() {
        let failed = failed_total(&cluster)?;
        let mark = agent.log_mark();
        rogue.present(cert)?;

        let Exchanged {
            outcome,
            local: src,
            took,
        } = common::exchange(web1, target).await?;
        ensure!(
            outcome == Outcome::Reset && took < RESET_DEADLINE,
            "{case}: web-1 expected a reset within {RESET_DEADLINE:?}, got {outcome:?} after {took:?}"
        );
        // The agent's refusal reached the rogue server as a TLS alert naming the problem:
        // the handshake never completed, so no HTTP/2 byte was sent.
        match rogue.next(case).await? {
            Event::Refused(Ok(got)) if got == alert => {}
            other => bail!("{case}: the rogue server expected alert {alert:?}, saw {other:?}"),
        }
        let line = agent
            .one_new_log_line(mark, TUNNEL_FAILED, SETTLE)
            .await
            .with_context(|| case)?;
        for needle in [
            format!("src={src}"),
            format!("dst={}", web2.addr(15008).ip()),
            "TLS handshake".to_owned(),
            reason,
        ] {
            ensure!(
                line.contains(&needle),
                "{case}: log line lacks {needle:?}: {line}"
            );
        }
        let want = n as u64 + 1;
        common::eventually(SETTLE, &format!("{case}: failures counted"), || {
            Ok(failed_total(&cluster)? > failed)
        })
        .await?;
        let counted = tls_failures(&cluster).await?;
        ensure!(
            counted == want,
            "{case}: {want} refused servers, TLS handshake failures counted {counted}"
        );
        ensure!(
            rogue.events.try_recv().is_err(),
            "{case}: the agent connected to the rogue server more than once"
        );
    }

    // Control: the right certificate from the cluster's CA. The agent's CONNECT for web-2:8080
    // arrives at this server, so the cases above really were refusals of this server.
    rogue.present(certs::leaf(WEB, &ca, Validity::Current)?)?;
    let Exchanged {
        outcome,
        local: src,
        ..
    } = common::exchange(web1, target).await?;
    ensure!(
        outcome == Outcome::Echoed,
        "control: web-1 got {outcome:?} through a server with the right certificate"
    );
    match rogue.next("control").await? {
        Event::Request {
            method,
            authority,
            forwarded,
        } if method == http::Method::CONNECT
            && authority == target.to_string()
            && forwarded == format!("for=\"{src}\"") => {}
        Event::NoRequest(why) => bail!("control: the handshake completed, then {why}"),
        other => bail!("control: expected web-1's CONNECT to {target}, saw {other:?}"),
    }
    let counted = tls_failures(&cluster).await?;
    ensure!(
        counted == 4,
        "control: TLS handshake failures now {counted}"
    );
    Ok(())
}
