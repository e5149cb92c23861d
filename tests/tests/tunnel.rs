//! End to end, as root: traffic between enrolled pods on different nodes travels inside HBONE
//! (HTTP/2 CONNECT over mutual TLS, port 15008); each side knows the other's identity; bad peers
//! are refused; certificates rotate under open streams; streams share pooled connections.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{PORT, mesh, mesh_with, pcap, proxy_sockets, wait_records};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB_IDENTITY: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_traffic_is_mutual_tls_only() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let _peer = web2.peer_server(PORT + 1).await?;

    // Watch the node-to-node link while the flows run.
    let capture = pcap::Capture::start(
        cluster.node(0).netns(),
        "eth0",
        &cluster.temp_dir().join("link.pcap"),
        "tcp",
    )?;

    let marker: Vec<u8> = b"PLAINTEXT-MARKER-the-link-must-never-show-this-".repeat(1400);
    let mut stream = web1.connect(web2.addr(PORT)).await?;
    stream.write_all(&marker).await?;
    let mut echoed = vec![0u8; marker.len()];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut echoed)).await??;
    ensure!(echoed == marker, "marker echoed wrongly");
    drop(stream);
    for len in [1, 64 * 1024, 16 * 1024 * 1024] {
        web1.send_and_verify(web2.addr(PORT), len).await?;
    }
    let report = web1.ask_peer(web2.addr(PORT + 1)).await?;
    ensure!(
        report.seen_by_server.ip() == web1.ip,
        "the server saw {report:?}, not web-1's address"
    );

    let segments = capture.finish()?;
    let with_data: Vec<_> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    ensure!(
        with_data.len() > 100,
        "the capture saw only {} data segments",
        with_data.len()
    );
    for s in &with_data {
        ensure!(
            s.source.port() == 15008 || s.destination.port() == 15008,
            "data outside the tunnel on the link: {} -> {}",
            s.source,
            s.destination
        );
        ensure!(
            !pcap::contains(&s.payload, b"PLAINTEXT-MARKER"),
            "plaintext visible on the link"
        );
    }
    // TLS records: handshake (22) then application data (23), version 0x0303.
    ensure!(
        with_data
            .iter()
            .any(|s| s.payload.starts_with(&[22, 3, 1]) || s.payload.starts_with(&[22, 3, 3]))
    );
    ensure!(with_data.iter().any(|s| s.payload.starts_with(&[23, 3, 3])));

    // Both ends know who talked: the destination's proxy saw web-1's identity and address.
    let inbound = wait_records(&cluster, 1, "inbound", web2.addr(PORT), 4).await?;
    for r in &inbound {
        ensure!(r["source_identity"] == WEB_IDENTITY, "destination saw {r}");
        ensure!(
            r["security"] == "mutual_tls" && r["route"] == "tunnel",
            "{r}"
        );
        ensure!(
            r["source"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{}:", web1.ip))),
            "{r}"
        );
    }
    let outbound = wait_records(&cluster, 0, "outbound", web2.addr(PORT), 4).await?;
    for r in &outbound {
        ensure!(
            r["destination_identity"] == WEB_IDENTITY && r["route"] == "tunnel",
            "{r}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_pooled_connections() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let mut streams = Vec::new();
    for _ in 0..40 {
        let mut s = web1.connect(web2.addr(PORT)).await?;
        s.write_all(b"hello\n").await?;
        let mut buf = [0u8; 6];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await??;
        streams.push(s);
    }
    let view = cluster.cli_json(0, &["connections", "-o", "json"])?;
    let tunnels = view["tunnels"].as_array().context("no tunnels")?;
    ensure!(
        tunnels.len() == 1,
        "40 streams should share one connection: {tunnels:#?}"
    );
    ensure!(tunnels[0]["active_streams"] == 40, "{tunnels:#?}");
    // Counted from outside: one TCP connection to web-2:15008 leaves node 0's proxy and one
    // arrives at node 1's, while the 40 application connections are all open.
    for node in 0..2 {
        let sockets = proxy_sockets(&cluster, node, web1.ip, web2.addr(15008))?;
        ensure!(
            sockets.len() == 1,
            "node {node}: {} tunnel connections for 40 streams: {sockets:#?}",
            sockets.len()
        );
    }
    drop(streams);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_opens_more_connections() -> Result<()> {
    let args = ["--pool-max-streams", "10", "--pool-idle-timeout", "3"];
    let Some((cluster, _agents)) = mesh_with(&args).await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let mut streams = Vec::new();
    for _ in 0..25 {
        let mut s = web1.connect(web2.addr(PORT)).await?;
        s.write_all(b"x").await?;
        let mut buf = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf)).await??;
        streams.push(s);
    }
    let view = cluster.cli_json(0, &["connections", "-o", "json"])?;
    let tunnels = view["tunnels"].as_array().context("no tunnels")?;
    ensure!(
        tunnels.len() == 3,
        "25 streams at 10 per connection need 3 connections: {tunnels:#?}"
    );
    let sockets = proxy_sockets(&cluster, 0, web1.ip, web2.addr(15008))?;
    ensure!(
        sockets.len() == 3,
        "node 0 holds {} tunnel connections for 25 streams at 10 each: {sockets:#?}",
        sockets.len()
    );

    // Unused, they close after the idle timeout (3 s), not before.
    drop(streams);
    let idle_since = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = cluster.cli_json(0, &["connections", "-o", "json"])?;
    ensure!(
        view["tunnels"].as_array().map(Vec::len) == Some(3),
        "tunnels closed before the idle timeout: {view}"
    );
    common::eventually(common::SETTLE, "idle tunnels closed", || {
        let view = cluster.cli_json(0, &["connections", "-o", "json"])?;
        Ok(view["tunnels"].as_array().is_some_and(|t| t.is_empty()))
    })
    .await?;
    let idle = idle_since.elapsed();
    ensure!(
        idle >= Duration::from_secs(3),
        "tunnels closed after {idle:?}, before the 3 s idle timeout"
    );
    common::eventually(common::SETTLE, "node 0's tunnel sockets closed", || {
        Ok(proxy_sockets(&cluster, 0, web1.ip, web2.addr(15008))?.is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_open_streams_and_new_streams_use_the_new_certificate() -> Result<()> {
    // 6 s certificates are replaced after about 3 s.
    let Some((cluster, _agents)) = mesh_with(&["--cert-ttl", "6"]).await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    let serial = |node: usize| -> Result<String> {
        let certs = cluster.cli_json(node, &["certs", "-o", "json"])?;
        let cert = certs
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["identity"] == WEB_IDENTITY)
            .with_context(|| format!("no certificate for {WEB_IDENTITY}: {certs}"))?;
        Ok(cert["serial"].as_str().unwrap_or_default().to_string())
    };

    let mut long = web1.connect(web2.addr(PORT)).await?;
    let mut buf = [0u8; 32];
    long.write_all(b"before rotation\n").await?;
    tokio::time::timeout(Duration::from_secs(10), long.read_exact(&mut buf[..16])).await??;
    let first = serial(0)?;

    // Keep talking on the same stream until the certificate has been replaced, and a little
    // after: every round trip must still come back.
    let deadline = tokio::time::Instant::now() + common::SETTLE;
    let mut rounds_after = 0;
    let mut second = first.clone();
    while rounds_after < 5 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "web's certificate was not rotated ({first}) within {:?}",
            common::SETTLE
        );
        long.write_all(b"during rotation\n").await?;
        tokio::time::timeout(Duration::from_secs(10), long.read_exact(&mut buf[..16]))
            .await
            .context("the long-lived stream stalled across rotation")??;
        ensure!(&buf[..16] == b"during rotation\n");
        if second == first {
            second = serial(0)?;
        } else {
            rounds_after += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A new stream uses the current certificate. The serial is read just before and just after
    // the stream; if a rotation fell in between, the stream is tried again.
    let mut checked = false;
    for _ in 0..5 {
        let before = serial(0)?;
        let flow = web1.send_and_verify(web2.addr(PORT), 1024).await?;
        let after = serial(0)?;
        if before != after {
            continue;
        }
        let source = flow.local.to_string();
        let mut record = None;
        common::eventually(common::SETTLE, "the new stream's inbound record", || {
            record = common::connections(&cluster, 1)?
                .into_iter()
                .find(|r| r["source"] == source.as_str() && !r["duration_ms"].is_null());
            Ok(record.is_some())
        })
        .await?;
        let presented = record.context("record")?["source_certificate_serial"].clone();
        ensure!(
            presented == before.as_str() && before != first,
            "new stream presented {presented} while the current certificate is {before} (first {first})"
        );
        checked = true;
        break;
    }
    ensure!(
        checked,
        "a rotation fell inside every one of 5 short streams"
    );
    drop(long);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_istio_names() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let _echo = web2.echo_server(PORT).await?;
    web1.send_and_verify(web2.addr(PORT), 1000).await?;
    wait_records(&cluster, 0, "outbound", web2.addr(PORT), 1).await?;
    wait_records(&cluster, 1, "inbound", web2.addr(PORT), 1).await?;
    let principal = WEB_IDENTITY;
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        let body = &common::metrics(&cluster, node).await?;
        let labels = [
            ("reporter", reporter),
            ("source_workload", "web-1"),
            ("source_workload_namespace", "shop"),
            ("source_principal", principal),
            ("source_app", "web"),
            ("destination_workload", "web-2"),
            ("destination_workload_namespace", "shop"),
            ("destination_principal", principal),
            ("destination_app", "web"),
            ("request_protocol", "tcp"),
            ("connection_security_policy", "mutual_tls"),
        ];
        // One connection of 1000 bytes each way: each family has exactly one sample with all
        // of these labels, and its value is that connection's.
        for (family, value) in [
            ("istio_tcp_connections_opened_total", 1.0),
            ("istio_tcp_connections_closed_total", 1.0),
            ("istio_tcp_sent_bytes_total", 1000.0),
            ("istio_tcp_received_bytes_total", 1000.0),
        ] {
            let samples: Vec<_> = common::samples(body, family)
                .into_iter()
                .filter(|(l, _)| {
                    labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                })
                .collect();
            ensure!(
                samples.len() == 1 && samples[0].1 == value,
                "node {node}: {family} with {labels:?}: want one sample of {value}, got {samples:?}\n{body}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_backpressure_cross_the_tunnel() -> Result<()> {
    let Some((cluster, agents)) = mesh().await? else {
        return Ok(());
    };
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));

    // A server that never reads: the client must be stopped by flow control, not buffered.
    let _stuck = mesh_tests::Server::custom(web2.listen(PORT).await?, |stream, _| async move {
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(stream);
        Ok(())
    });
    let mut client = web1.connect(web2.addr(PORT)).await?;
    let chunk = vec![7u8; 1024 * 1024];
    // Bytes the client's kernel took within `window`, one write at a time.
    async fn written_within(
        client: &mut tokio::net::TcpStream,
        chunk: &[u8],
        window: Duration,
    ) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + window;
        let mut written = 0;
        while let Ok(n) = tokio::time::timeout_at(deadline, client.write(chunk)).await {
            written += n?;
        }
        Ok(written)
    }
    // Write until a 3 s window takes nothing (a slow spell of the machine only delays this),
    // then the stall must hold: 5 s more take nothing, and neither agent's memory grows.
    const LIMIT: usize = 64 * 1024 * 1024;
    let mut written = 0usize;
    loop {
        ensure!(
            written < LIMIT,
            "{} MiB went into a server that reads nothing",
            written >> 20
        );
        let n = written_within(&mut client, &chunk, Duration::from_secs(3)).await?;
        written += n;
        if n == 0 {
            break;
        }
    }
    let rss_at_stall: Vec<u64> = agents
        .iter()
        .map(|a| a.rss_kib().context("agent RSS"))
        .collect::<Result<_>>()?;
    let more = written_within(&mut client, &chunk, Duration::from_secs(5)).await?;
    ensure!(
        more == 0,
        "{more} bytes more went in after the stall ({} MiB before)",
        written >> 20
    );
    for (agent, before) in agents.iter().zip(rss_at_stall) {
        let rss = agent.rss_kib().context("agent RSS")?;
        ensure!(
            rss < 48 * 1024 && rss <= before + 1024,
            "agent {} holds {rss} KiB while a stream is stalled ({before} KiB when it stalled)",
            agent.node_name()
        );
    }
    drop(client);

    // A server that resets: the client sees a reset, not a clean end.
    let _resetter =
        mesh_tests::Server::custom(web2.listen(PORT + 1).await?, |mut stream, _| async move {
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await?;
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
            drop(stream);
            Ok(())
        });
    let mut client = web1.connect(web2.addr(PORT + 1)).await?;
    client.write_all(b"hello").await?;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf)).await?;
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("expected a reset through the tunnel, got {other:?}"),
    }
    Ok(())
}
