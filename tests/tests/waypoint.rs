//! End to end, as root: a namespace behind a waypoint. The Gateway API's mesh conformance tests
//! (`conformance/tests/mesh/*.go`), one test each, ported to the simulated cluster with their
//! routes and cases (see `common/conformance.rs` for the setup and how a case is checked).

mod common;

use anyhow::{Result, bail, ensure};
use common::conformance::{Case, NS, WAYPOINT_POD, conformance_mesh, route};

/// MeshBasic: with no route, a GET to `echo` is answered 200 by one of its pods — through the
/// waypoint: the pod sees the waypoint's address as the client, the client's node recorded the
/// connection as sent to the waypoint, and the echo's node saw the waypoint's identity. Its
/// connections to the echoes are kept alive across requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_basic() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let waypoint_ip = mesh.cluster.pod(NS, WAYPOINT_POD).ip;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let echo = mesh.echo("echo", 80, "/", &[])?;
        ensure!(
            echo.remote_ip() == Some(waypoint_ip),
            "the echo was reached from {:?}, not from the waypoint {waypoint_ip}: {:?}",
            echo.remote_ip(),
            echo.0
        );
        ensure!(
            echo.path() == "/" && echo.host() == "echo",
            "echo saw {:?}",
            echo.0
        );
        seen.insert(echo.pod().to_owned());
    }
    ensure!(
        seen.len() == 2,
        "6 requests went only to {seen:?}: the endpoints are not both used"
    );
    let given = mesh.echo("echo", 80, "/", &["-H", "x-request-id: from-the-client"])?;
    ensure!(
        given.header("x-request-id").as_deref() == Some("from-the-client"),
        "the client's x-request-id was not kept: {:?}",
        given.0
    );
    // Six client connections, yet each echo was connected to once: the waypoint keeps its
    // connections to endpoints alive and reuses them.
    let accepted = [mesh.servers[0].accepted(), mesh.servers[2].accepted()];
    ensure!(
        accepted == [1, 1],
        "the echoes accepted {accepted:?} connections for 6 requests: not kept alive"
    );
    let vip = std::net::SocketAddr::from((mesh.vip("echo"), 80));
    let records = common::wait_records(&mesh.cluster, 0, "outbound", vip, 1).await?;
    ensure!(
        records.iter().all(|r| r["route"] == "waypoint"
            && r["destination"] == std::net::SocketAddr::from((waypoint_ip, 15008)).to_string()),
        "the client's node did not send the connections to the waypoint: {records:#?}"
    );
    let principal = format!("spiffe://cluster.local/ns/{NS}/sa/namespace");
    let inbound = common::connections(&mesh.cluster, 1)?;
    ensure!(
        inbound.iter().any(|r| r["direction"] == "inbound"
            && r["source_identity"] == principal.as_str()
            && r["destination_workload"] == format!("{NS}/echo-v2").as_str()),
        "echo-v2's node saw no connection from the waypoint's identity {principal}: {inbound:#?}"
    );
    Ok(())
}

/// MeshTrafficSplit: `/v1` goes to echo-v1, `/v2` to echo-v2; with routes in force, a path no
/// rule matches is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_traffic_split() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches:\n    - path: {type: PathPrefix, value: /v1}\n    backendRefs:\n    - {name: echo-v1, port: 80}\n  - matches:\n    - path: {type: PathPrefix, value: /v2}\n    backendRefs:\n    - {name: echo-v2, port: 80}\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-split", "echo", rules),
        &[
            Case {
                path: "/v1",
                backend: "echo-v1",
                ..Case::default()
            },
            Case {
                path: "/v2",
                backend: "echo-v2",
                ..Case::default()
            },
            Case {
                path: "/other",
                status: 404,
                ..Case::default()
            },
        ],
    )
    .await
}

/// MeshFrontend: a route on echo-v2 sets a response header when echo-v2 is called by its
/// Service; the same call to the pod's own address does not go through the waypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_frontend() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let pod = mesh.cluster.pod(NS, "echo-v2").addr(8080).to_string();
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-frontend", "echo-v2", FRONTEND_RULES),
        &[
            Case {
                host: "echo-v2",
                backend: "echo-v2",
                response_headers: &[("X-Header-Set", "set")],
                ..Case::default()
            },
            Case {
                host: &pod,
                backend: "echo-v2",
                absent_response_headers: &["X-Header-Set"],
                ..Case::default()
            },
        ],
    )
    .await
}

const FRONTEND_RULES: &str = "  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set:\n        - {name: X-Header-Set, value: set}\n    backendRefs:\n    - {name: echo-v2, port: 80}\n";

/// MeshFrontendHostname (MeshClusterIPMatching): the route follows the Service address the
/// client dialed, whatever the Host header says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_cluster_ip_matching() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-frontend", "echo-v2", FRONTEND_RULES),
        &[
            Case {
                host: "echo-v2",
                headers: &[("Host", "echo-v1")],
                backend: "echo-v2",
                response_headers: &[("X-Header-Set", "set")],
                ..Case::default()
            },
            Case {
                host: "echo-v1",
                headers: &[("Host", "echo-v2")],
                backend: "echo-v1",
                absent_response_headers: &["X-Header-Set"],
                ..Case::default()
            },
        ],
    )
    .await
}

/// MeshPorts: a parentRef with `port: 80` leaves the Service's 8080 alone; one without a port
/// takes every port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_ports() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let v1 = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: mesh-ports-v1\n  namespace: {NS}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: echo-v1, port: 80}}\n  rules:\n  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set:\n        - {{name: X-Header-Set, value: v1}}\n    backendRefs:\n    - {{name: echo-v1, port: 80}}\n"
    );
    let v2 = route(
        "mesh-ports-v2",
        "echo-v2",
        "  - filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set:\n        - {name: X-Header-Set, value: v2}\n    backendRefs:\n    - {name: echo-v2, port: 80}\n",
    );
    mesh.apply_and_expect(
        "route.yaml",
        &format!("{v1}---\n{v2}"),
        &[
            Case {
                host: "echo-v1",
                backend: "echo-v1",
                response_headers: &[("X-Header-Set", "v1")],
                ..Case::default()
            },
            Case {
                host: "echo-v1:8080",
                backend: "echo-v1",
                absent_response_headers: &["X-Header-Set"],
                ..Case::default()
            },
            Case {
                host: "echo-v2",
                backend: "echo-v2",
                response_headers: &[("X-Header-Set", "v2")],
                ..Case::default()
            },
            Case {
                host: "echo-v2:8080",
                backend: "echo-v2",
                response_headers: &[("X-Header-Set", "v2")],
                ..Case::default()
            },
        ],
    )
    .await
}

/// MeshHTTPRouteSimpleSameNamespace: a route in the Service's namespace sends it to echo-v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_simple_same_namespace() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    mesh.apply_and_expect(
        "route.yaml",
        &route(
            "gateway-conformance-mesh-test",
            "echo",
            "  - backendRefs:\n    - {name: echo-v1, port: 8080}\n",
        ),
        &[Case {
            backend: "echo-v1",
            ..Case::default()
        }],
    )
    .await
}

/// MeshHTTPRouteMatching: path-prefix segments and a `version` header pick v1 or v2;
/// `/v2example` is not under `/v2`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_matching() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches:\n    - path: {type: PathPrefix, value: /}\n    backendRefs:\n    - {name: echo-v1, port: 80}\n  - matches:\n    - path: {type: PathPrefix, value: /v2}\n    - headers:\n      - {name: version, value: two}\n    backendRefs:\n    - {name: echo-v2, port: 80}\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-matching", "echo", rules),
        &[
            Case {
                path: "/",
                backend: "echo-v1",
                ..Case::default()
            },
            Case {
                path: "/example",
                backend: "echo-v1",
                ..Case::default()
            },
            Case {
                path: "/v2",
                backend: "echo-v2",
                ..Case::default()
            },
            Case {
                path: "/v2/example",
                backend: "echo-v2",
                ..Case::default()
            },
            Case {
                path: "/v2example",
                backend: "echo-v1",
                ..Case::default()
            },
            Case {
                path: "/",
                headers: &[("version", "two")],
                backend: "echo-v2",
                ..Case::default()
            },
        ],
    )
    .await
}

/// MeshHTTPRouteQueryParamMatching: the `animal` query parameter picks the backend, alone or
/// with paths and headers; no match is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_query_param_matching() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - matches:\n    - queryParams: [{name: animal, value: whale}]\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches:\n    - queryParams: [{name: animal, value: dolphin}]\n    backendRefs: [{name: echo-v2, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /path1}\n      queryParams: [{name: animal, value: whale}]\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches:\n    - headers: [{name: version, value: one}]\n      queryParams: [{name: animal, value: whale}]\n    backendRefs: [{name: echo-v2, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /path3}\n      queryParams: [{name: animal, value: shark}]\n    - path: {type: PathPrefix, value: /path4}\n      headers: [{name: version, value: three}]\n      queryParams: [{name: animal, value: kraken}]\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /path5}\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches:\n    - queryParams: [{name: animal, value: hydra}]\n    backendRefs: [{name: echo-v2, port: 8080}]\n";
    let to = |path, backend| Case {
        path,
        backend,
        ..Case::default()
    };
    let missing = |path| Case {
        path,
        status: 404,
        ..Case::default()
    };
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-query-param-matching", "echo", rules),
        &[
            to("/?animal=whale", "echo-v1"),
            to("/?animal=dolphin", "echo-v2"),
            to("/?animal=whale&otherparam=irrelevant", "echo-v1"),
            to("/?animal=dolphin&color=yellow", "echo-v2"),
            missing("/?color=blue"),
            missing("/?animal=dog"),
            missing("/?animal=whaledolphin"),
            missing("/"),
            to("/path1?animal=whale", "echo-v1"),
            Case {
                path: "/?animal=whale",
                headers: &[("version", "one")],
                backend: "echo-v2",
                ..Case::default()
            },
            to("/path3?animal=shark", "echo-v1"),
            Case {
                path: "/path4?animal=kraken",
                headers: &[("version", "three")],
                backend: "echo-v1",
                ..Case::default()
            },
            missing("/?animal=shark"),
            missing("/path4?animal=kraken"),
            to("/path5?animal=hydra", "echo-v1"),
        ],
    )
    .await
}

/// The route of MeshHTTPRouteRequestHeaderModifier: a header change per path, given on the
/// rule or on its backendRef.
fn header_modifier_route(at_backend: bool) -> String {
    let modifiers = [
        (
            "/set",
            "set: [{name: X-Header-Set, value: set-overwrites-values}]",
        ),
        (
            "/add",
            "add: [{name: X-Header-Add, value: add-appends-values}]",
        ),
        ("/remove", "remove: [X-Header-Remove]"),
        (
            "/multiple",
            "set: [{name: X-Header-Set-1, value: header-set-1}, {name: X-Header-Set-2, value: header-set-2}], add: [{name: X-Header-Add-1, value: header-add-1}, {name: X-Header-Add-2, value: header-add-2}, {name: X-Header-Add-3, value: header-add-3}], remove: [X-Header-Remove-1, X-Header-Remove-2]",
        ),
        (
            "/case-insensitivity",
            "set: [{name: X-Header-Set, value: header-set}], add: [{name: X-Header-Add, value: header-add}], remove: [X-Header-Remove]",
        ),
    ];
    let rules: String = modifiers
        .iter()
        .map(|(path, modifier)| {
            let filters = format!(
                "filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{{modifier}}}}}]"
            );
            let matches = format!("  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n");
            if at_backend {
                format!("{matches}    backendRefs: [{{name: echo-v1, port: 8080, {filters}}}]\n")
            } else {
                format!(
                    "{matches}    {filters}\n    backendRefs: [{{name: echo-v1, port: 8080}}]\n"
                )
            }
        })
        .collect();
    route("mesh-request-header-modifier", "echo", &rules)
}

/// The cases of MeshHTTPRouteRequestHeaderModifier (and its backendRef variant).
fn header_modifier_cases() -> [Case<'static>; 7] {
    let case = |path, headers, seen_headers, absent_seen_headers| Case {
        path,
        headers,
        seen_headers,
        absent_seen_headers,
        backend: "echo-v1",
        ..Case::default()
    };
    [
        case(
            "/set",
            &[("Some-Other-Header", "val")],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            &[],
        ),
        case(
            "/set",
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "some-other-value"),
            ],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "set-overwrites-values"),
            ],
            &[],
        ),
        case(
            "/add",
            &[("Some-Other-Header", "val")],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "add-appends-values"),
            ],
            &[],
        ),
        case(
            "/add",
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value"),
            ],
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value,add-appends-values"),
            ],
            &[],
        ),
        case(
            "/remove",
            &[("X-Header-Remove", "val")],
            &[],
            &["X-Header-Remove"],
        ),
        case(
            "/multiple",
            &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set-1", "header-set-1"),
                ("X-Header-Set-2", "header-set-2"),
                ("X-Header-Add-1", "header-add-1"),
                ("X-Header-Add-2", "add-val-2,header-add-2"),
                ("X-Header-Add-3", "header-add-3"),
                ("Another-Header", "another-header-val"),
            ],
            &["X-Header-Remove-1", "X-Header-Remove-2"],
        ),
        case(
            "/case-insensitivity",
            &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
            &[
                ("X-Header-Set", "header-set"),
                ("X-Header-Add", "original-val-add,header-add"),
                ("Another-Header", "another-header-val"),
            ],
            &["x-header-remove"],
        ),
    ]
}

/// MeshHTTPRouteRequestHeaderModifier: set, add (appending with a comma) and remove, names
/// in any case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_request_header_modifier() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    mesh.apply_and_expect(
        "route.yaml",
        &header_modifier_route(false),
        &header_modifier_cases(),
    )
    .await
}

/// MeshHTTPRouteBackendRequestHeaderModifier: the same changes given on the backendRef.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_backend_request_header_modifier() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    mesh.apply_and_expect(
        "route.yaml",
        &header_modifier_route(true),
        &header_modifier_cases(),
    )
    .await
}

/// A redirect rule for each `(path prefix, requestRedirect fields)`.
fn redirect_route(name: &str, redirects: &[(&str, &str)]) -> String {
    let rules: String = redirects
        .iter()
        .map(|(path, redirect)| {
            format!("  - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n    filters:\n    - type: RequestRedirect\n      requestRedirect: {{{redirect}}}\n")
        })
        .collect();
    route(name, "echo", &rules)
}

fn redirect<'a>(path: &'a str, status: u16, location: &'a str) -> Case<'a> {
    Case {
        path,
        status,
        location: Some(location),
        ..Case::default()
    }
}

/// MeshHTTPRouteRedirectHostAndStatus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_redirect_host_and_status() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let route = redirect_route(
        "mesh-redirect-host-and-status",
        &[
            ("/hostname-redirect", "hostname: example.org"),
            ("/host-and-status", "statusCode: 301, hostname: example.org"),
        ],
    );
    mesh.apply_and_expect(
        "route.yaml",
        &route,
        &[
            redirect(
                "/hostname-redirect",
                302,
                "http://example.org/hostname-redirect",
            ),
            redirect(
                "/host-and-status",
                301,
                "http://example.org/host-and-status",
            ),
        ],
    )
    .await
}

/// MeshHTTPRouteRedirectPath: ReplacePrefixMatch and ReplaceFullPath, alone and with a host or
/// a status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_redirect_path() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let route = redirect_route(
        "mesh-redirect-path",
        &[
            (
                "/original-prefix",
                "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}",
            ),
            (
                "/full",
                "path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}",
            ),
            (
                "/path-and-host",
                "hostname: example.org, path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}",
            ),
            (
                "/path-and-status",
                "path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}, statusCode: 301",
            ),
            (
                "/full-path-and-host",
                "hostname: example.org, path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}",
            ),
            (
                "/full-path-and-status",
                "path: {type: ReplaceFullPath, replaceFullPath: /replacement-full}, statusCode: 301",
            ),
        ],
    );
    mesh.apply_and_expect(
        "route.yaml",
        &route,
        &[
            redirect(
                "/original-prefix/lemon",
                302,
                "http://echo/replacement-prefix/lemon",
            ),
            redirect(
                "/full/path/original",
                302,
                "http://echo/full-path-replacement",
            ),
            redirect(
                "/path-and-host",
                302,
                "http://example.org/replacement-prefix",
            ),
            redirect("/path-and-status", 301, "http://echo/replacement-prefix"),
            redirect(
                "/full-path-and-host",
                302,
                "http://example.org/replacement-full",
            ),
            redirect("/full-path-and-status", 301, "http://echo/replacement-full"),
        ],
    )
    .await
}

/// MeshHTTPRouteRedirectPort.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_redirect_port() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let route = redirect_route(
        "mesh-redirect-port",
        &[
            ("/port", "port: 8083"),
            ("/port-and-host", "hostname: example.org, port: 8083"),
            ("/port-and-status", "port: 8083, statusCode: 301"),
            (
                "/port-and-host-and-status",
                "port: 8083, hostname: example.org, statusCode: 302",
            ),
        ],
    );
    mesh.apply_and_expect(
        "route.yaml",
        &route,
        &[
            redirect("/port", 302, "http://echo:8083/port"),
            redirect(
                "/port-and-host",
                302,
                "http://example.org:8083/port-and-host",
            ),
            redirect("/port-and-status", 301, "http://echo:8083/port-and-status"),
            redirect(
                "/port-and-host-and-status",
                302,
                "http://example.org:8083/port-and-host-and-status",
            ),
        ],
    )
    .await
}

/// MeshHTTPRouteSchemeRedirect: to https, whose well-known port is then left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_scheme_redirect() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let route = redirect_route(
        "mesh-redirect-scheme",
        &[
            ("/scheme", "scheme: https"),
            ("/scheme-and-host", "hostname: example.org, scheme: https"),
            ("/scheme-and-status", "scheme: https, statusCode: 301"),
            (
                "/scheme-and-host-and-status",
                "scheme: https, statusCode: 302, hostname: example.org",
            ),
        ],
    );
    mesh.apply_and_expect(
        "route.yaml",
        &route,
        &[
            redirect("/scheme", 302, "https://echo/scheme"),
            redirect(
                "/scheme-and-host",
                302,
                "https://example.org/scheme-and-host",
            ),
            redirect("/scheme-and-status", 301, "https://echo/scheme-and-status"),
            redirect(
                "/scheme-and-host-and-status",
                302,
                "https://example.org/scheme-and-host-and-status",
            ),
        ],
    )
    .await
}

/// MeshHTTPRoute303Redirect, MeshHTTPRoute307Redirect and MeshHTTPRoute308Redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_303_307_308_redirects() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let route = redirect_route(
        "mesh-status-redirects",
        &[
            ("/redirect", "statusCode: 303"),
            ("/temporary", "statusCode: 307"),
            ("/permanent", "statusCode: 308"),
        ],
    );
    mesh.apply_and_expect(
        "route.yaml",
        &route,
        &[
            redirect("/redirect", 303, "http://echo/redirect"),
            redirect("/temporary", 307, "http://echo/temporary"),
            redirect("/permanent", 308, "http://echo/permanent"),
        ],
    )
    .await
}

/// MeshHTTPRouteRewritePath: prefix and full-path rewrites, alone and with header changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_rewrite_path() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let headers = "    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: X-Header-Set, value: set-overwrites-values}]\n        add: [{name: X-Header-Add, value: header-val-1}, {name: X-Header-Add-Append, value: header-val-2}]\n        remove: [X-Header-Remove]\n";
    let rule = |prefix: &str, rewrite: &str, extra: &str| {
        format!(
            "  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n    filters:\n    - type: URLRewrite\n      urlRewrite: {{path: {{{rewrite}}}}}\n{extra}    backendRefs: [{{name: echo-v1, port: 80}}]\n"
        )
    };
    let rules = [
        rule(
            "/prefix/one",
            "type: ReplacePrefixMatch, replacePrefixMatch: /one",
            "",
        ),
        rule(
            "/strip-prefix",
            "type: ReplacePrefixMatch, replacePrefixMatch: /",
            "",
        ),
        rule(
            "/full/one",
            "type: ReplaceFullPath, replaceFullPath: /one",
            "",
        ),
        rule(
            "/full/rewrite-path-and-modify-headers",
            "type: ReplaceFullPath, replaceFullPath: /test",
            headers,
        ),
        rule(
            "/prefix/rewrite-path-and-modify-headers",
            "type: ReplacePrefixMatch, replacePrefixMatch: /prefix",
            headers,
        ),
    ]
    .concat();
    let sent: &[(&str, &str)] = &[
        ("X-Header-Remove", "remove-val"),
        ("X-Header-Add-Append", "append-val-1"),
        ("X-Header-Set", "set-val"),
    ];
    let seen: &[(&str, &str)] = &[
        ("X-Header-Add", "header-val-1"),
        ("X-Header-Add-Append", "append-val-1,header-val-2"),
        ("X-Header-Set", "set-overwrites-values"),
    ];
    let rewritten = |path, seen_path| Case {
        path,
        seen_path: Some(seen_path),
        backend: "echo-v1",
        ..Case::default()
    };
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-rewrite-path", "echo", &rules),
        &[
            rewritten("/prefix/one/two", "/one/two"),
            rewritten("/strip-prefix/three", "/three"),
            rewritten("/strip-prefix", "/"),
            rewritten("/full/one/two", "/one"),
            Case {
                path: "/full/rewrite-path-and-modify-headers/test",
                headers: sent,
                seen_path: Some("/test"),
                seen_headers: seen,
                absent_seen_headers: &["X-Header-Remove"],
                backend: "echo-v1",
                ..Case::default()
            },
            Case {
                path: "/prefix/rewrite-path-and-modify-headers/one",
                headers: sent,
                seen_path: Some("/prefix/one"),
                seen_headers: seen,
                absent_seen_headers: &["X-Header-Remove"],
                backend: "echo-v1",
                ..Case::default()
            },
        ],
    )
    .await
}

/// MeshHTTPRouteNamedRule: named and unnamed rules route alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_named_rule() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let rules = "  - name: named-rule\n    matches: [{path: {type: PathPrefix, value: /named}}]\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /unnamed}}]\n    backendRefs: [{name: echo-v2, port: 8080}]\n";
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-http-named-rules", "echo", rules),
        &[
            Case {
                path: "/named",
                seen_path: Some("/named"),
                backend: "echo-v1",
                ..Case::default()
            },
            Case {
                path: "/unnamed",
                seen_path: Some("/unnamed"),
                backend: "echo-v2",
                ..Case::default()
            },
        ],
    )
    .await
}

/// MeshHTTPRouteWeight: 70/30 between echo-v1 and echo-v2, within the suite's tolerance over
/// 1,000 requests (curl sends them on one kept-alive connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_http_route_weight() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    mesh.apply_and_expect(
        "route.yaml",
        &route("mesh-weighted-backends", "echo", "  - backendRefs:\n    - {name: echo-v1, port: 8080, weight: 70}\n    - {name: echo-v2, port: 8080, weight: 30}\n"),
        &[Case::default()],
    )
    .await?;
    const REQUESTS: usize = 1000;
    let counts = mesh.spread("echo", 80, REQUESTS)?;
    let v1 = counts.get("echo-v1").copied().unwrap_or(0) as f64 / REQUESTS as f64;
    let v2 = counts.get("echo-v2").copied().unwrap_or(0) as f64 / REQUESTS as f64;
    // The suite's tolerance: within 5 percentage points of each weight.
    ensure!(
        (v1 - 0.7).abs() <= 0.05 && (v2 - 0.3).abs() <= 0.05,
        "{REQUESTS} requests split {counts:?}: not 70/30 within 5 points"
    );
    Ok(())
}

/// Traffic to a port that is not HTTP passes as TCP through the waypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_passes_through_the_waypoint() -> Result<()> {
    let Some(mesh) = conformance_mesh().await? else {
        return Ok(());
    };
    let client = mesh.cluster.pod(NS, "echo-v1");
    let address = std::net::SocketAddr::from((mesh.vip("echo-v2"), 9090));
    common::expect_echo(client, address).await?;
    client.send_and_verify(address, 256 * 1024).await?;
    let waypoint_ip = mesh.cluster.pod(NS, WAYPOINT_POD).ip;
    let peers = mesh.servers[3].peers();
    ensure!(
        peers.len() == 2
            && peers
                .iter()
                .all(|p| p.ip() == std::net::IpAddr::V4(waypoint_ip)),
        "echo-v2's TCP server was not reached from the waypoint {waypoint_ip}: {peers:?}"
    );
    let records = common::wait_records(&mesh.cluster, 0, "outbound", address, 2).await?;
    ensure!(
        records.iter().all(|r| r["route"] == "waypoint"),
        "not sent to the waypoint: {records:#?}"
    );
    if mesh.waypoint.log().contains("panicked") {
        bail!("the waypoint panicked:\n{}", mesh.waypoint.log_tail(50));
    }
    Ok(())
}
