//! End to end, as root: the tunnel port (15008) refuses, in the TLS handshake, peers whose
//! certificate is untrusted, expired, of another trust domain, missing, or without a SPIFFE
//! identity, logging each refusal once with its reason; it answers bad requests (GET, CONNECT
//! to anything but an enrolled pod of its node) with a 4xx and a policy denial with 401; and a
//! well-formed HBONE client with a good certificate (not our agent: this test) gets through,
//! as a ztunnel on another node would.

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::{
    PORT,
    certs::{self, Leaf, Validity},
    mesh,
};
use mesh_tests::{Agent, LogMark};
use rcgen::SanType;
use rustls::AlertDescription;
use tokio::io::AsyncReadExt;

/// What the agent logs for each refused handshake.
const TLS_REFUSED: &str = "TLS handshake refused";
/// What it logs for a CONNECT to anything but an enrolled pod of its node.
const NOT_LOCAL: &str = "CONNECT to a destination that is not an enrolled pod of this node";
/// What it logs for a connection its policy denies.
const DENIED: &str = "connection denied";
/// Ceiling for the agent's log line about something that already happened.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// What a well-formed CONNECT through the tunnel port came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    /// 200 and the echo came back.
    Echoed,
}

/// A handshake the server must refuse: the TLS alert the client received for it, during the
/// handshake or (TLS 1.3: the server checks the client's certificate after the client is done)
/// on its first read, and the client's address (as the agent logs it). Anything else — a
/// completed connection, a close without an alert, a reset, a hang — is an error.
async fn refusal(
    pod: &mesh_tests::Pod,
    tunnel: SocketAddr,
    cert: Option<Leaf>,
) -> Result<(AlertDescription, SocketAddr)> {
    let tcp = pod.connect(tunnel).await?;
    let local = tcp.local_addr()?;
    let connector = tokio_rustls::TlsConnector::from(certs::client_config(cert)?);
    let attempt = async {
        let error = match connector.connect(certs::server_name()?, tcp).await {
            Err(e) => e,
            Ok(mut tls) => {
                let mut buf = [0u8; 1];
                match tls.read(&mut buf).await {
                    Err(e) => e,
                    Ok(0) => bail!("the server closed the connection without a TLS alert"),
                    Ok(_) => bail!("the server sent application data to a peer it should refuse"),
                }
            }
        };
        let alert = certs::alert_received(&error)
            .with_context(|| format!("the refusal is not a TLS alert: {error}"))?;
        anyhow::Ok(alert)
    };
    let alert = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .context("no refusal within 10 s")??;
    Ok((alert, local))
}

/// A CONNECT (or another method) with a certificate the server accepts: its HTTP outcome,
/// and the client's address. A TLS or HTTP/2 failure is an error.
async fn attempt(
    pod: &mesh_tests::Pod,
    tunnel: SocketAddr,
    cert: Leaf,
    method: http::Method,
    authority: &str,
) -> Result<(Outcome, SocketAddr)> {
    let config = certs::client_config(Some(cert))?;
    let tcp = pod.connect(tunnel).await?;
    let local = tcp.local_addr()?;
    let attempt = async {
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(certs::server_name()?, tcp)
            .await
            .context("TLS handshake")?;
        let (send, connection) = h2::client::handshake(tls)
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(connection);
        let mut send = send.ready().await.context("HTTP/2 ready")?;
        let uri = if method == http::Method::CONNECT {
            authority.to_string()
        } else {
            format!("http://{authority}/")
        };
        let request = http::Request::builder().method(method).uri(uri).body(())?;
        let (response, mut body) = send.send_request(request, false).context("request")?;
        let response = response.await.context("response")?;
        if response.status() != 200 {
            return Ok(Outcome::Status(response.status().as_u16()));
        }
        body.send_data(Bytes::from_static(b"ping\n"), false)?;
        let mut recv = response.into_body();
        let data = recv.data().await.context("no echo")??;
        ensure!(&data[..] == b"ping\n", "echo differs: {data:?}");
        anyhow::Ok(Outcome::Echoed)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .context("attempt timed out")??;
    Ok((outcome, local))
}

/// The one `message` line the agent logged since `mark`, which must name the peer `src` and
/// each of `reasons`.
async fn one_new_line(
    agent: &mut Agent,
    mark: LogMark,
    message: &str,
    src: SocketAddr,
    reasons: &[&str],
) -> Result<String> {
    let line = agent.one_new_log_line(mark, message, LOG_WAIT).await?;
    let peer = format!("src={src}");
    for needle in std::iter::once(peer.as_str()).chain(reasons.iter().copied()) {
        ensure!(
            line.contains(needle),
            "{message:?} line lacks {needle:?}: {line}"
        );
    }
    Ok(line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_refuses_bad_peers_and_serves_good_ones() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    // A plain pod plays the remote proxy: its traffic is not captured on its own node.
    let (rogue, web1, web2, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("shop", "web-1"),
        cluster.pod("shop", "web-2"),
        cluster.pod("legacy", "batch-2"),
    );
    let echo = web2.echo_server(PORT).await?;
    let tunnel = web2.addr(15008);
    let target = web2.addr(PORT).to_string();
    let ca = certs::cluster_ca(&cluster.ca_dir())?;
    let good = "spiffe://cluster.local/ns/legacy/sa/batch";
    let agent = &mut agents[1];

    // Each refused handshake: a TLS alert naming the problem reaches the client, and the
    // agent logs one line with the peer and the reason.
    let no_spiffe = certs::leaf_with_sans(
        vec![SanType::DnsName(
            "batch.legacy.svc.cluster.local".try_into()?,
        )],
        &ca,
        Validity::Current,
    )?;
    let refused: [(&str, Option<Leaf>, AlertDescription, &str); 5] = [
        (
            "untrusted root",
            Some(certs::leaf(
                good,
                &certs::untrusted_ca()?,
                Validity::Current,
            )?),
            AlertDescription::UnknownCA,
            "UnknownIssuer",
        ),
        (
            "expired certificate",
            Some(certs::leaf(good, &ca, Validity::Expired)?),
            AlertDescription::CertificateExpired,
            "certificate expired",
        ),
        (
            "foreign trust domain",
            Some(certs::leaf(
                "spiffe://evil.example/ns/legacy/sa/batch",
                &ca,
                Validity::Current,
            )?),
            AlertDescription::CertificateUnknown,
            "is outside trust domain cluster.local",
        ),
        (
            "no client certificate",
            None,
            AlertDescription::CertificateRequired,
            "peer sent no certificates",
        ),
        (
            "certificate without a SPIFFE identity",
            Some(no_spiffe),
            AlertDescription::CertificateUnknown,
            "has no URI SAN, so no SPIFFE identity",
        ),
    ];
    let refusals = refused.len();
    for (case, cert, alert, reason) in refused {
        let mark = agent.log_mark();
        let (got, src) = refusal(rogue, tunnel, cert)
            .await
            .with_context(|| format!("{case}: not refused in the handshake"))?;
        ensure!(
            got == alert,
            "{case}: the client got alert {got:?}, not {alert:?}"
        );
        one_new_line(agent, mark, TLS_REFUSED, src, &[reason])
            .await
            .with_context(|| case)?;
    }

    // Well-formed peer, bad requests: 4xx, each logged once.
    let (outcome, _) = attempt(
        rogue,
        tunnel,
        certs::leaf(good, &ca, Validity::Current)?,
        http::Method::GET,
        &target,
    )
    .await?;
    ensure!(outcome == Outcome::Status(405), "GET got {outcome:?}");
    let node1_admin = SocketAddr::from((cluster.node(1).link_ip, 15000));
    let not_local = [
        ("a pod that is not enrolled", batch2.addr(PORT)),
        ("an enrolled pod of another node", web1.addr(PORT)),
        ("the agent's admin address", "127.0.0.1:15000".parse()?),
        ("the node's own address, admin port", node1_admin),
    ];
    let not_local_count = not_local.len();
    for (case, authority) in not_local {
        let mark = agent.log_mark();
        let (outcome, src) = attempt(
            rogue,
            tunnel,
            certs::leaf(good, &ca, Validity::Current)?,
            http::Method::CONNECT,
            &authority.to_string(),
        )
        .await
        .with_context(|| case)?;
        ensure!(
            outcome == Outcome::Status(400),
            "CONNECT to {case} ({authority}) got {outcome:?}"
        );
        one_new_line(agent, mark, NOT_LOCAL, src, &[&format!("dst={authority}")])
            .await
            .with_context(|| case)?;
    }

    // And a good one is carried, with its identity recorded.
    let (outcome, _) = attempt(
        rogue,
        tunnel,
        certs::leaf(good, &ca, Validity::Current)?,
        http::Method::CONNECT,
        &target,
    )
    .await?;
    ensure!(outcome == Outcome::Echoed, "good peer got {outcome:?}");
    let records = common::wait_records(&cluster, 1, "inbound", web2.addr(PORT), 1).await?;
    ensure!(
        records.iter().any(|r| r["source_identity"] == good),
        "{records:#?}"
    );

    // A valid peer that policy denies: 401, logged with the policy, and the destination
    // never sees a connection.
    common::apply(
        &cluster,
        "policy.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-rogue\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/legacy/sa/rogue\"]\n",
    )
    .await?;
    let accepted = echo.accepted();
    let mark = agent.log_mark();
    let (outcome, src) = attempt(
        rogue,
        tunnel,
        certs::leaf(
            "spiffe://cluster.local/ns/legacy/sa/rogue",
            &ca,
            Validity::Current,
        )?,
        http::Method::CONNECT,
        &target,
    )
    .await?;
    ensure!(
        outcome == Outcome::Status(401),
        "a peer denied by policy got {outcome:?}"
    );
    one_new_line(agent, mark, DENIED, src, &["shop/deny-rogue"]).await?;
    ensure!(
        echo.accepted() == accepted,
        "the destination accepted a connection of a denied peer"
    );

    // Nothing was logged twice, late; the counters say the same.
    let logged = agent.log_lines_since(LogMark::default(), TLS_REFUSED).len();
    ensure!(
        logged == refusals,
        "{refusals} refused handshakes, {logged} {TLS_REFUSED:?} lines"
    );
    let metrics = common::metrics(&cluster, 1).await?;
    let failures =
        "mesh_agent_connection_failures_total{reporter=\"destination\",listener=\"tunnel\",reason=";
    for expected in [
        format!("{failures}\"tls handshake\"}} {refusals}"),
        format!("{failures}\"unknown destination\"}} {not_local_count}"),
        format!("{failures}\"bad request\"}} 1"),
    ] {
        if !metrics.lines().any(|l| l == expected) {
            bail!("no sample {expected:?}:\n{metrics}");
        }
    }
    // The certificate without a SPIFFE identity was refused in the handshake, not after it.
    ensure!(
        !metrics.contains("reason=\"no peer identity\""),
        "a peer without identity got past the handshake:\n{metrics}"
    );
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_agent_connections_denied_total{")
                && l.contains("policy=\"shop/deny-rogue\"")
                && l.ends_with(" 1")),
        "denial not counted:\n{metrics}"
    );
    Ok(())
}
