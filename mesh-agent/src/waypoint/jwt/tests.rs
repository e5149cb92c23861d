//! The authenticator on whole requests: locations, errors, stripping, outputs, remote keys.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::testing::{SigningKey, now_plus};
use super::*;
use crate::state::RequestAuthenticationResource;

const ISSUER: &str = "https://issuer.example";

/// A policy from its spec (YAML), as the state sources read it.
fn policy(spec: &str) -> RequestAuthentication {
    let text = format!("metadata: {{name: jwt, namespace: shop}}\nspec: {spec}\n");
    let resource: RequestAuthenticationResource = serde_yaml::from_str(&text).expect("yaml");
    RequestAuthentication::from_resource(&resource).expect("valid policy")
}

/// A rule for [`ISSUER`] with `key`'s JWKS inline and `extra` fields.
fn inline(key: &SigningKey, extra: &str) -> RequestAuthentication {
    let jwks = serde_json::to_string(&key.jwks().to_string()).expect("quoted");
    policy(&format!(
        "{{jwtRules: [{{issuer: '{ISSUER}', jwks: {jwks} {extra}}}]}}"
    ))
}

fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut builder = http::Request::builder().uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).expect("request").into_parts().0
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn alice(key: &SigningKey) -> String {
    key.sign(&json!({"iss": ISSUER, "sub": "alice", "aud": ["shop"], "exp": now_plus(300)}))
}

async fn run(
    policies: &[&RequestAuthentication],
    parts: &mut Parts,
) -> Result<Option<RequestAuth>, String> {
    Authenticator::new()
        .authenticate(policies, parts)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_valid_token_gives_the_request_its_principal_and_is_stripped() {
    let key = SigningKey::es256("k1");
    let policy = inline(&key, "");
    let mut parts = request("/a", &[("authorization", &bearer(&alice(&key)))]);
    let auth = run(&[&policy], &mut parts)
        .await
        .expect("valid")
        .expect("auth");
    assert_eq!(auth.principal, format!("{ISSUER}/alice"));
    assert_eq!(auth.audiences, ["shop"]);
    assert_eq!(auth.claims["sub"], "alice");
    assert!(parts.headers.get("authorization").is_none(), "stripped");
}

#[tokio::test]
async fn without_a_token_the_request_passes_untouched() {
    let key = SigningKey::es256("k1");
    let policy = inline(&key, "");
    let mut parts = request("/a?x=1", &[("authorization", "Basic dXNlcjpwdw==")]);
    assert_eq!(run(&[&policy], &mut parts).await, Ok(None));
    assert_eq!(parts.headers["authorization"], "Basic dXNlcjpwdw==");
    assert_eq!(run(&[], &mut parts).await, Ok(None));
}

#[tokio::test]
async fn bad_tokens_get_envoys_messages() {
    let key = SigningKey::es256("k1");
    let policy = inline(&key, ", audiences: [shop]");
    let cases = [
        (
            key.sign(&json!({"iss": ISSUER, "sub": "a", "aud": "shop", "exp": now_plus(-120)})),
            "Jwt is expired",
        ),
        (
            key.sign(&json!({"iss": ISSUER, "sub": "a", "aud": "shop", "nbf": now_plus(120)})),
            "Jwt not yet valid",
        ),
        (
            SigningKey::es256("k1").sign(&json!({"iss": ISSUER, "sub": "a", "aud": "shop"})),
            "Jwt verification fails",
        ),
        (
            key.sign(&json!({"iss": "https://other.example", "sub": "a", "aud": "shop"})),
            "Jwt issuer is not configured",
        ),
        (
            key.sign(&json!({"sub": "a", "aud": "shop"})),
            "Jwt issuer is not configured",
        ),
        (
            key.sign(&json!({"iss": ISSUER, "sub": "a", "aud": ["web"]})),
            "Audiences in Jwt are not allowed",
        ),
        (
            "not-a-jwt".to_string(),
            "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
        ),
    ];
    for (token, message) in cases {
        let mut parts = request("/a", &[("authorization", &bearer(&token))]);
        assert_eq!(run(&[&policy], &mut parts).await, Err(message.to_string()));
        assert!(
            parts.headers.get("authorization").is_some(),
            "{message}: not stripped"
        );
    }
}

#[tokio::test]
async fn custom_header_with_prefix_and_query_param() {
    let key = SigningKey::ed25519("k1");
    let policy = inline(
        &key,
        ", fromHeaders: [{name: x-jwt, prefix: 'Token '}], fromParams: [jwt]",
    );
    let token = alice(&key);
    let mut parts = request("/a", &[("x-jwt", &format!("Token {token}"))]);
    let auth = run(&[&policy], &mut parts).await.expect("valid");
    assert!(auth.is_some());
    assert!(parts.headers.get("x-jwt").is_none());
    let mut parts = request(&format!("/a?b=2&jwt={token}"), &[]);
    assert!(run(&[&policy], &mut parts).await.expect("valid").is_some());
    assert_eq!(parts.uri, "/a?b=2");
    // The default locations are not read when the rule names its own.
    let mut parts = request("/a", &[("authorization", &bearer("not-a-jwt"))]);
    assert_eq!(run(&[&policy], &mut parts).await, Ok(None));
}

#[tokio::test]
async fn default_query_parameter_and_forwarding() {
    let key = SigningKey::es256("k1");
    let token = alice(&key);
    let policy = inline(&key, "");
    let mut parts = request(&format!("/a?access_token={token}"), &[]);
    assert!(run(&[&policy], &mut parts).await.expect("valid").is_some());
    assert_eq!(parts.uri, "/a");
    let forwarding = inline(&key, ", forwardOriginalToken: true");
    let mut parts = request("/a", &[("authorization", &bearer(&token))]);
    assert!(
        run(&[&forwarding], &mut parts)
            .await
            .expect("valid")
            .is_some()
    );
    assert_eq!(parts.headers["authorization"], bearer(&token));
}

#[tokio::test]
async fn output_headers_carry_the_payload_and_claims() {
    let key = SigningKey::es256("k1");
    let policy = inline(
        &key,
        ", outputPayloadToHeader: x-jwt-payload, outputClaimToHeaders: [{header: x-sub, claim: sub}, {header: x-level, claim: level}, {header: x-admin, claim: admin}, {header: x-team, claim: org.team}, {header: x-groups, claim: groups}]",
    );
    let token = key.sign(&json!({
        "iss": ISSUER, "sub": "alice", "level": 3, "admin": false,
        "org": {"team": "payments"}, "groups": ["a", "b"],
    }));
    let mut parts = request(
        "/a",
        &[("authorization", &bearer(&token)), ("x-sub", "spoofed")],
    );
    assert!(run(&[&policy], &mut parts).await.expect("valid").is_some());
    let payload = token.split('.').nth(1).expect("payload");
    assert_eq!(parts.headers["x-jwt-payload"], payload);
    let subs: Vec<&HeaderValue> = parts.headers.get_all("x-sub").iter().collect();
    assert_eq!(subs, ["alice"], "the client's own value is replaced");
    assert_eq!(parts.headers["x-level"], "3");
    assert_eq!(parts.headers["x-admin"], "false");
    assert_eq!(parts.headers["x-team"], "payments");
    assert!(parts.headers.get("x-groups").is_none(), "a list is skipped");
}

#[tokio::test]
async fn a_token_is_checked_only_by_rules_that_read_where_it_was_found() {
    let (key, other) = (SigningKey::es256("k1"), SigningKey::es256("k2"));
    let first = inline(&key, ", fromHeaders: [{name: x-first}]");
    let jwks = serde_json::to_string(&other.jwks().to_string()).expect("quoted");
    let second = policy(&format!(
        "{{jwtRules: [{{issuer: 'https://second.example', jwks: {jwks}}}]}}"
    ));
    // A token of the first issuer in the second rule's place: that rule does not know it.
    let mut parts = request("/a", &[("authorization", &bearer(&alice(&key)))]);
    assert_eq!(
        run(&[&first, &second], &mut parts).await,
        Err("Jwt issuer is not configured".into())
    );
    let token = other.sign(&json!({"iss": "https://second.example", "sub": "bob"}));
    let mut parts = request("/a", &[("authorization", &bearer(&token))]);
    let auth = run(&[&first, &second], &mut parts).await.expect("valid");
    assert_eq!(
        auth.map(|a| a.principal),
        Some("https://second.example/bob".into())
    );
}

#[tokio::test]
async fn an_invalid_policy_refuses_every_token_and_lets_requests_without_one_pass() {
    let key = SigningKey::es256("k1");
    let resource: RequestAuthenticationResource = serde_yaml::from_str(
        "metadata: {name: broken, namespace: shop}\nspec: {jwtRules: [{issuer: ''}]}\n",
    )
    .expect("yaml");
    let problems = RequestAuthentication::from_resource(&resource).expect_err("invalid");
    let broken = RequestAuthentication::fail_closed(&resource, &problems);
    let good = inline(&key, "");
    let mut parts = request("/a", &[("authorization", &bearer(&alice(&key)))]);
    let result = Authenticator::new()
        .authenticate(&[&good, &broken], &mut parts)
        .await;
    assert_eq!(result, Err(JwtError::PolicyInvalid("shop/broken".into())));
    assert_eq!(
        result.map_err(|e| e.to_string()),
        Err("Jwt verification fails".into())
    );
    let mut parts = request("/a", &[]);
    assert_eq!(run(&[&broken], &mut parts).await, Ok(None));
}

/// A JWKS server on 127.0.0.1 that counts its requests; after `good` of them it answers 503.
async fn jwks_server(body: String, good: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let count = Arc::new(AtomicUsize::new(0));
    let served = count.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, served) = (body.clone(), served.clone());
            let service = service_fn(move |_request| {
                let mut response = http::Response::new(Full::new(Bytes::from(body.clone())));
                if served.fetch_add(1, Ordering::SeqCst) >= good {
                    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                }
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (address, count)
}

fn remote(uri: &str) -> RequestAuthentication {
    policy(&format!(
        "{{jwtRules: [{{issuer: '{ISSUER}', jwksUri: '{uri}', timeout: 2s}}]}}"
    ))
}

#[tokio::test]
async fn jwks_uri_is_fetched_once_and_cached() {
    let key = SigningKey::es256("k1");
    let (address, count) = jwks_server(key.jwks().to_string(), usize::MAX).await;
    let policy = remote(&format!("http://{address}/keys"));
    let authenticator = Arc::new(Authenticator::new());
    let token = alice(&key);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (authenticator, policy, token) =
                (authenticator.clone(), policy.clone(), token.clone());
            tokio::spawn(async move {
                let mut parts = request("/a", &[("authorization", &bearer(&token))]);
                authenticator.authenticate(&[&policy], &mut parts).await
            })
        })
        .collect();
    for task in tasks {
        let auth = task.await.expect("joined").expect("valid");
        assert!(auth.is_some());
    }
    let mut parts = request("/a", &[("authorization", &bearer(&token))]);
    assert!(
        authenticator
            .authenticate(&[&policy], &mut parts)
            .await
            .expect("valid")
            .is_some()
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "one fetch for all requests"
    );
    let forged = SigningKey::es256("k1").sign(&json!({"iss": ISSUER, "sub": "mallory"}));
    let mut parts = request("/a", &[("authorization", &bearer(&forged))]);
    assert_eq!(
        authenticator.authenticate(&[&policy], &mut parts).await,
        Err(JwtError::VerificationFails)
    );
}

#[tokio::test]
async fn jwks_uri_that_does_not_answer_fails_its_issuers_tokens() {
    let key = SigningKey::es256("k1");
    // A port nobody listens on any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    drop(listener);
    let policy = remote(&format!("http://{address}/keys"));
    let mut parts = request("/a", &[("authorization", &bearer(&alice(&key)))]);
    assert_eq!(
        run(&[&policy], &mut parts).await,
        Err("Jwks remote fetch is failed".into())
    );
    // A server that answers with no key set.
    let (address, _) = jwks_server("{\"keys\": []}".into(), usize::MAX).await;
    let policy = remote(&format!("http://{address}/keys"));
    let mut parts = request("/a", &[("authorization", &bearer(&alice(&key)))]);
    assert_eq!(
        run(&[&policy], &mut parts).await,
        Err("Jwks remote fetch is failed".into())
    );
}

#[tokio::test]
async fn refetched_after_the_cache_time_and_stale_keys_survive_a_failed_refresh() {
    let key = SigningKey::es256("k1");
    let (address, count) = jwks_server(key.jwks().to_string(), 1).await;
    let policy = remote(&format!("http://{address}/keys"));
    let authenticator = Authenticator::with_cache_times(Duration::ZERO, Duration::ZERO);
    for expected in 1..=3 {
        let mut parts = request("/a", &[("authorization", &bearer(&alice(&key)))]);
        let auth = authenticator.authenticate(&[&policy], &mut parts).await;
        assert!(auth.expect("valid").is_some(), "request {expected}");
        assert_eq!(count.load(Ordering::SeqCst), expected, "asked every time");
    }
}
