//! End to end, as root: the tunnel port (15008) refuses peers whose certificate is untrusted,
//! expired or of another trust domain, and answers bad requests with a 4xx; a well-formed
//! HBONE client with a good certificate (not our agent: this test) gets through, as a ztunnel
//! on another node would.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::{PORT, mesh};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// This test checks the server's side only, so it takes any server certificate.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A leaf for `spiffe` signed by `issuer`; expired when asked.
fn leaf(
    spiffe: &str,
    issuer: &Issuer<'_, KeyPair>,
    expired: bool,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![SanType::URI(spiffe.try_into()?)];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, issuer)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![cert.der().clone()], der))
}

fn untrusted_ca() -> Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "rogue root");
    Ok(Issuer::new(params, key))
}

fn cluster_ca(dir: &std::path::Path) -> Result<Issuer<'static, KeyPair>> {
    let cert = std::fs::read_to_string(dir.join("ca-cert.pem")).context("reading ca-cert.pem")?;
    let key = KeyPair::from_pem(
        &std::fs::read_to_string(dir.join("ca-key.pem")).context("reading ca-key.pem")?,
    )?;
    Ok(Issuer::from_ca_cert_pem(&cert, key)?)
}

/// What a CONNECT through the tunnel port came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// TLS or HTTP/2 failed: the peer was refused.
    Refused(String),
    Status(u16),
    /// 200 and the echo came back.
    Echoed,
}

async fn attempt(
    pod: &mesh_tests::Pod,
    tunnel: SocketAddr,
    cert: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    method: http::Method,
    authority: &str,
) -> Result<Outcome> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(cert.0, cert.1)?;
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = pod.connect(tunnel).await?;
    let name = ServerName::try_from("mesh.invalid")?.to_owned();
    let attempt = async {
        let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            Ok(tls) => tls,
            Err(e) => return Ok(Outcome::Refused(format!("tls: {e}"))),
        };
        let (send, connection) = match h2::client::handshake(tls).await {
            Ok(h) => h,
            Err(e) => return Ok(Outcome::Refused(format!("h2 handshake: {e}"))),
        };
        tokio::spawn(connection);
        let mut send = match send.ready().await {
            Ok(s) => s,
            Err(e) => return Ok(Outcome::Refused(format!("h2 ready: {e}"))),
        };
        let uri = if method == http::Method::CONNECT {
            authority.to_string()
        } else {
            format!("http://{authority}/")
        };
        let request = http::Request::builder().method(method).uri(uri).body(())?;
        let (response, mut body) = match send.send_request(request, false) {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Refused(format!("h2 request: {e}"))),
        };
        let response = match response.await {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Refused(format!("h2 response: {e}"))),
        };
        if response.status() != 200 {
            return Ok(Outcome::Status(response.status().as_u16()));
        }
        body.send_data(Bytes::from_static(b"ping\n"), false)?;
        let mut recv = response.into_body();
        let data = recv.data().await.context("no echo")??;
        ensure!(&data[..] == b"ping\n", "echo differs: {data:?}");
        anyhow::Ok(Outcome::Echoed)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .context("attempt timed out")?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_refuses_bad_peers_and_serves_good_ones() -> Result<()> {
    let Some((cluster, mut agents)) = mesh().await? else {
        return Ok(());
    };
    // A plain pod plays the remote proxy: its traffic is not captured on its own node.
    let (rogue, web2, batch2) = (
        cluster.pod("legacy", "batch-1"),
        cluster.pod("shop", "web-2"),
        cluster.pod("legacy", "batch-2"),
    );
    let _echo = web2.echo_server(PORT).await?;
    let tunnel = web2.addr(15008);
    let target = web2.addr(PORT).to_string();
    let ca = cluster_ca(&cluster.ca_dir())?;
    let good = "spiffe://cluster.local/ns/legacy/sa/batch";

    let outcome = attempt(
        rogue,
        tunnel,
        leaf(good, &untrusted_ca()?, false)?,
        http::Method::CONNECT,
        &target,
    )
    .await?;
    ensure!(
        matches!(outcome, Outcome::Refused(_)),
        "untrusted root got {outcome:?}"
    );
    let outcome = attempt(
        rogue,
        tunnel,
        leaf(good, &ca, true)?,
        http::Method::CONNECT,
        &target,
    )
    .await?;
    ensure!(
        matches!(outcome, Outcome::Refused(_)),
        "expired certificate got {outcome:?}"
    );
    let outcome = attempt(
        rogue,
        tunnel,
        leaf("spiffe://evil.example/ns/legacy/sa/batch", &ca, false)?,
        http::Method::CONNECT,
        &target,
    )
    .await?;
    ensure!(
        matches!(outcome, Outcome::Refused(_)),
        "foreign trust domain got {outcome:?}"
    );
    let log = agents[1]
        .wait_for_log("TLS handshake refused", Duration::from_secs(3))
        .await?;
    ensure!(
        log.contains(&rogue.ip.to_string()),
        "refusal log line lacks the peer: {log}"
    );

    // Well-formed peer, bad requests: 4xx.
    let outcome = attempt(
        rogue,
        tunnel,
        leaf(good, &ca, false)?,
        http::Method::GET,
        &target,
    )
    .await?;
    ensure!(outcome == Outcome::Status(405), "GET got {outcome:?}");
    let elsewhere = batch2.addr(PORT).to_string();
    let outcome = attempt(
        rogue,
        tunnel,
        leaf(good, &ca, false)?,
        http::Method::CONNECT,
        &elsewhere,
    )
    .await?;
    ensure!(
        outcome == Outcome::Status(400),
        "CONNECT to a pod that is not enrolled here got {outcome:?}"
    );

    // And a good one is carried, with its identity recorded.
    let outcome = attempt(
        rogue,
        tunnel,
        leaf(good, &ca, false)?,
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
    let metrics = common::metrics(&cluster, 1).await?;
    if !metrics.contains("mesh_agent_connection_failures_total{reporter=\"destination\",listener=\"tunnel\",reason=\"tls handshake\"} 3") {
        bail!("refusals not counted:\n{metrics}");
    }
    Ok(())
}
