//! End to end, as root: a connection to a Service address goes to one of its endpoints, spread
//! round robin, and a dead endpoint is skipped.

mod common;

use anyhow::{Context, Result, ensure};
use common::{apply, expect_echo, mesh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_address_spreads_over_endpoints_and_skips_dead_ones() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let vip = std::net::Ipv4Addr::new(10, 96, cluster.octet(), 10);
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  clusterIP: {vip}\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n"
    );
    apply(&cluster, "service-web.yaml", &service).await?;
    let (web1, web2) = (cluster.pod("shop", "web-1"), cluster.pod("shop", "web-2"));
    let client = web1;
    let server1 = web1.echo_server(8080).await?;
    let server2 = web2.echo_server(8080).await?;
    let address = std::net::SocketAddr::from((vip, 80));
    for i in 0..10 {
        expect_echo(client, address)
            .await
            .with_context(|| format!("connection {i} to the service"))?;
    }
    ensure!(
        server1.accepted() >= 3 && server2.accepted() >= 3,
        "not spread: web-1 {}, web-2 {}",
        server1.accepted(),
        server2.accepted()
    );
    let records = common::connections(&cluster, 0)?;
    ensure!(
        records
            .iter()
            .any(|r| r["destination_service"] == "shop/web"
                && r["original_destination"] == address.to_string()),
        "no record names the service: {records:#?}"
    );

    // web-1's server goes away: every connection still succeeds, through web-2. The server's
    // task ends asynchronously; wait until web-1 no longer listens, or a connection could land
    // in a listener about to close, which the kernel then resets.
    drop(server1);
    common::eventually(common::SETTLE, "web-1 stopped listening", || {
        Ok(web1
            .exec(&["ss", "-Hltn", "sport = :8080"])?
            .trim()
            .is_empty())
    })
    .await?;
    let before = server2.accepted();
    for i in 0..6 {
        expect_echo(client, address)
            .await
            .with_context(|| format!("connection {i} after web-1 died"))?;
    }
    ensure!(
        server2.accepted() == before + 6,
        "web-2 took {} of 6",
        server2.accepted() - before
    );
    Ok(())
}

/// A Service without a selector is served by its EndpointSlice: the connection to the service
/// address reaches the slice's pod, on the slice's port, through the mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selectorless_service_is_served_by_its_endpoint_slice() -> Result<()> {
    let Some((cluster, _agents)) = mesh().await? else {
        return Ok(());
    };
    let vip = std::net::Ipv4Addr::new(10, 96, cluster.octet(), 20);
    let web2 = cluster.pod("shop", "web-2");
    let state = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ext\n  namespace: shop\nspec:\n  clusterIP: {vip}\n  ports:\n  - name: web\n    port: 80\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ext-1\n  namespace: shop\n  labels:\n    kubernetes.io/service-name: ext\naddressType: IPv4\nports:\n- name: web\n  port: 8081\nendpoints:\n- addresses: [\"{}\"]\n",
        web2.ip
    );
    apply(&cluster, "service-ext.yaml", &state).await?;
    let server = web2.echo_server(8081).await?;
    let address = std::net::SocketAddr::from((vip, 80));
    for i in 0..3 {
        expect_echo(cluster.pod("shop", "web-1"), address)
            .await
            .with_context(|| format!("connection {i} to the selector-less service"))?;
    }
    ensure!(
        server.accepted() == 3,
        "the slice's pod took {} of 3",
        server.accepted()
    );
    let records = common::connections(&cluster, 0)?;
    ensure!(
        records
            .iter()
            .any(|r| r["destination_service"] == "shop/ext"
                && r["route"] == "tunnel"
                && r["destination"] == std::net::SocketAddr::from((web2.ip, 8081)).to_string()),
        "no tunnelled record to the slice's pod: {records:#?}"
    );
    Ok(())
}
