//! The inspection commands (`status`, `workloads`, `connections`, `certs`, `policies`,
//! `explain`, `bpf`): fetch a view from the admin API and print it as a table, or as the same
//! JSON with `-o json`.

pub mod client;
pub mod table;

use std::net::SocketAddr;

use serde_json::Value;

use self::table::Table;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// An HTTP request to explain at the waypoint in front of the destination; all empty: none.
#[derive(Debug, Clone, Default)]
pub struct HttpQuestion {
    pub method: Option<String>,
    pub path: Option<String>,
    /// `name: value`, each.
    pub headers: Vec<String>,
    /// A JWT, sent as `authorization: Bearer`.
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub enum View {
    Status,
    Workloads,
    Connections,
    Certs,
    Policies,
    Explain {
        from: String,
        to: String,
        http: HttpQuestion,
    },
    Bpf,
}

impl View {
    fn path(&self) -> String {
        match self {
            View::Status => "/status".into(),
            View::Workloads => "/workloads".into(),
            View::Connections => "/connections".into(),
            View::Certs => "/certs".into(),
            View::Policies => "/policies".into(),
            View::Explain { from, to, http } => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.append_pair("from", from).append_pair("to", to);
                if let Some(method) = &http.method {
                    query.append_pair("method", method);
                }
                if let Some(path) = &http.path {
                    query.append_pair("path", path);
                }
                for header in &http.headers {
                    query.append_pair("header", header);
                }
                if let Some(token) = &http.token {
                    query.append_pair("token", token);
                }
                format!("/explain?{}", query.finish())
            }
            View::Bpf => "/bpf".into(),
        }
    }
}

pub async fn show(admin: SocketAddr, view: View, output: Output) -> anyhow::Result<String> {
    let value = client::get(admin, &view.path()).await?;
    Ok(match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&value)?),
        Output::Table => match view {
            View::Status => status(&value),
            View::Workloads => workloads(&value),
            View::Connections => connections(&value),
            View::Certs => certs(&value),
            View::Policies => policies(&value),
            View::Explain { .. } => explain(&value),
            View::Bpf => bpf(&value),
        },
    })
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Seconds since the epoch, as UTC `YYYY-MM-DDTHH:MM:SSZ`.
fn unix_time(v: &Value) -> String {
    v.as_i64()
        .map(crate::identity::rfc3339::format_unix)
        .unwrap_or_else(|| s(v))
}

fn status(v: &Value) -> String {
    let state = &v["state"];
    let capture = &v["capture"];
    let totals = &v["connections"]["totals"];
    let mut out = String::new();
    let mut line = |k: &str, val: String| out.push_str(&format!("{k:<22}{val}\n"));
    line("Node:", s(&v["node"]));
    line("Version:", s(&v["version"]));
    line("Ready:", s(&v["ready"]));
    line("Uptime:", format!("{}s", s(&v["uptime_seconds"])));
    line("State source:", s(&state["path"]));
    line("State generation:", s(&state["status"]["generation"]));
    line("State error:", s(&state["status"]["last_error"]));
    line("Namespaces:", s(&state["namespaces"]));
    line("Workloads:", s(&state["workloads"]));
    line("Services:", s(&state["services"]));
    line(
        "Policies:",
        format!(
            "{} AuthorizationPolicy, {} PeerAuthentication",
            s(&state["authorization_policies"]),
            s(&state["peer_authentications"])
        ),
    );
    for watch in state["watches"].as_array().into_iter().flatten() {
        let mut text = format!("{}, {} objects", s(&watch["state"]), s(&watch["objects"]));
        if !watch["failing_since"].is_null() {
            text.push_str(&format!(
                ", failing since {}: {}",
                s(&watch["failing_since"]["secs_since_epoch"]),
                s(&watch["last_error"])
            ));
        }
        line(&format!("Watch {}:", s(&watch["kind"])), text);
    }
    line("Capture active:", s(&capture["active"]));
    for problem in capture["problems"].as_array().into_iter().flatten() {
        line("Capture retrying:", s(problem));
    }
    line(
        "Enrolled on node:",
        format!(
            "{} ({} captured)",
            s(&capture["enrolled_on_node"]),
            s(&capture["captured"])
        ),
    );
    if let Some(pending) = capture["pending"].as_object() {
        for (ip, reason) in pending {
            line("Pending:", format!("{ip}: {}", s(reason)));
        }
    }
    let lifecycle = &v["lifecycle"];
    let dataplane = &lifecycle["dataplane"];
    if dataplane.is_object() {
        let how = if dataplane["adopted"] == true {
            format!(
                "adopted (created by {}, pinned since {})",
                s(&dataplane["created_by"]),
                unix_time(&dataplane["pinned_since"])
            )
        } else {
            format!("created {}", unix_time(&dataplane["pinned_since"]))
        };
        line(
            "Data plane:",
            format!(
                "layout v{}, {how}, {}",
                s(&dataplane["layout"]),
                s(&dataplane["pin_dir"])
            ),
        );
    }
    for (key, label) in [("previous", "Previous agent:"), ("successor", "Successor:")] {
        let process = &lifecycle[key];
        if process.is_object() {
            line(
                label,
                format!(
                    "pid {} ({}), {}",
                    s(&process["pid"]),
                    s(&process["version"]),
                    s(&process["state"])
                ),
            );
        }
    }
    let open_files = &v["limits"]["open_files"];
    line(
        "Open-files limit:",
        format!(
            "{} (hard {})",
            s(&open_files["current"]),
            s(&open_files["hard"])
        ),
    );
    let proxy = &v["limits"]["proxy"];
    let max = &proxy["settings"];
    line(
        "Connections:",
        format!(
            "{} of {} ({} per source, {} per destination)",
            s(&proxy["connections"]),
            s(&max["connections"]),
            s(&max["connections_per_source"]),
            s(&max["connections_per_destination"])
        ),
    );
    line(
        "TLS handshakes:",
        format!(
            "{} of {} ({} per source)",
            s(&proxy["handshakes"]),
            s(&max["handshakes"]),
            s(&max["handshakes_per_source"])
        ),
    );
    line(
        "Tunnels accepted:",
        format!(
            "{} of {} ({} per identity, {} streams each)",
            s(&proxy["tunnels"]),
            s(&max["tunnels"]),
            s(&max["tunnels_per_identity"]),
            s(&max["streams_per_tunnel"])
        ),
    );
    if let Some(refused) = proxy["refused"].as_object().filter(|r| !r.is_empty()) {
        let list: Vec<String> = refused
            .iter()
            .map(|(limit, n)| format!("{limit} {}", s(n)))
            .collect();
        line("Refused at limits:", list.join(", "));
    }
    line("Trust domain:", s(&v["trust_domain"]));
    line("Certificates:", s(&v["certificates"]));
    line("Open connections:", s(&v["connections"]["open"]));
    line("Tunnels:", s(&v["connections"]["tunnels"]));
    line(
        "Connections total:",
        format!(
            "{} outbound, {} inbound, {} closed, {} failed, {} denied",
            s(&totals["outbound_opened"]),
            s(&totals["inbound_opened"]),
            s(&totals["closed"]),
            s(&totals["failed"]),
            s(&totals["denied"])
        ),
    );
    out
}

fn workloads(v: &Value) -> String {
    let mut t = Table::new(&[
        "NAMESPACE",
        "NAME",
        "NODE",
        "IP",
        "SERVICE-ACCOUNT",
        "ENROLLED",
        "CAPTURE",
        "REASON",
    ]);
    for w in v.as_array().into_iter().flatten() {
        t.row(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            s(&w["node"]),
            s(&w["ip"]),
            s(&w["service_account"]),
            if w["enrolled"] == Value::Bool(true) {
                "yes".into()
            } else {
                "no".into()
            },
            s(&w["capture_device"]),
            s(&w["reason"]),
        ]);
    }
    t.render()
}

fn connection_rows(t: &mut Table, list: &Value, state: &str) {
    for c in list.as_array().into_iter().flatten() {
        let state = match (&c["error"], c["verdict"].as_str(), state) {
            (Value::String(e), _, _) => format!("failed: {e}"),
            (_, Some(verdict), _) if verdict != "allow" => verdict.to_string(),
            (_, _, state) => state.to_string(),
        };
        let destination = match c["original_destination"] == c["destination"] {
            true => s(&c["destination"]),
            false => format!(
                "{} -> {}",
                s(&c["original_destination"]),
                s(&c["destination"])
            ),
        };
        t.row(vec![
            s(&c["id"]),
            s(&c["direction"]),
            s(&c["source"]),
            s(&c["source_workload"]),
            s(&c["source_identity"]),
            destination,
            s(&c["destination_workload"]),
            s(&c["route"]),
            s(&c["security"]),
            s(&c["bytes_sent"]),
            s(&c["bytes_received"]),
            state,
        ]);
    }
}

fn connections(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID",
        "DIRECTION",
        "SOURCE",
        "SOURCE-WORKLOAD",
        "SOURCE-IDENTITY",
        "DESTINATION",
        "DESTINATION-WORKLOAD",
        "ROUTE",
        "SECURITY",
        "SENT",
        "RECEIVED",
        "STATE",
    ]);
    connection_rows(&mut t, &v["open"], "open");
    connection_rows(&mut t, &v["recent"], "closed");
    let mut tunnels = Table::new(&[
        "TUNNEL",
        "SOURCE-IDENTITY",
        "DESTINATION-IDENTITY",
        "ADDRESS",
        "LOCAL",
        "STREAMS",
        "TOTAL",
    ]);
    for c in v["tunnels"].as_array().into_iter().flatten() {
        tunnels.row(vec![
            s(&c["id"]),
            s(&c["source_identity"]),
            s(&c["destination_identity"]),
            s(&c["address"]),
            s(&c["local_address"]),
            s(&c["active_streams"]),
            s(&c["total_streams"]),
        ]);
    }
    let totals = &v["totals"];
    format!(
        "{}\n{} outbound, {} inbound opened; {} closed ({} failed); {} denied; {} bytes sent, {} received\n\nTunnels (pooled HBONE connections opened by this node):\n{}",
        t.render(),
        s(&totals["outbound_opened"]),
        s(&totals["inbound_opened"]),
        s(&totals["closed"]),
        s(&totals["failed"]),
        s(&totals["denied"]),
        s(&totals["bytes_sent"]),
        s(&totals["bytes_received"]),
        tunnels.render(),
    )
}

fn certs(v: &Value) -> String {
    let mut t = Table::new(&["IDENTITY", "SERIAL", "NOT-BEFORE", "NOT-AFTER", "CHAIN"]);
    for c in v.as_array().into_iter().flatten() {
        let chain: Vec<String> = c["chain"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} (serial {}, until {})",
                    s(&e["subject"]),
                    s(&e["serial"]),
                    s(&e["not_after"])
                )
            })
            .collect();
        t.row(vec![
            s(&c["identity"]),
            s(&c["serial"]),
            s(&c["not_before"]),
            s(&c["not_after"]),
            chain.join(" <- "),
        ]);
    }
    t.render()
}

fn policies(v: &Value) -> String {
    let mut t = Table::new(&[
        "WORKLOAD",
        "IDENTITY",
        "PLAINTEXT",
        "POLICY",
        "ACTION",
        "SCOPE",
        "RULES",
        "DRY-RUN",
    ]);
    for w in v.as_array().into_iter().flatten() {
        let list = w["policies"].as_array().cloned().unwrap_or_default();
        if list.is_empty() {
            t.row(vec![
                s(&w["workload"]),
                s(&w["identity"]),
                s(&w["mtls_mode"]),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for p in list {
            t.row(vec![
                s(&w["workload"]),
                s(&w["identity"]),
                s(&w["mtls_mode"]),
                format!("{}/{}", s(&p["namespace"]), s(&p["name"])),
                s(&p["action"]),
                s(&p["scope"]),
                s(&p["rules"]),
                s(&p["dry_run"]),
            ]);
        }
    }
    t.render()
}

fn explain(v: &Value) -> String {
    let source = &v["source"];
    let mut out = format!(
        "From:    {} ({}{})\nTo:      {}{}\nVerdict: {}\n",
        s(&source["ip"]),
        s(&source["workload"]),
        match source["identity"].as_str() {
            Some(id) => format!(", {id}"),
            None => ", not in the mesh".into(),
        },
        s(&v["destination"]),
        match (v["service"].as_str(), v["waypoint"].as_str()) {
            (Some(svc), Some(waypoint)) => format!(" (service {svc}, through waypoint {waypoint})"),
            (Some(svc), None) => format!(" (service {svc})"),
            (None, Some(waypoint)) => format!(" (through waypoint {waypoint})"),
            (None, None) => String::new(),
        },
        s(&v["summary"]),
    );
    let mut t = Table::new(&[
        "ENDPOINT",
        "WORKLOAD",
        "ROUTE",
        "PLAINTEXT-MODE",
        "VERDICT",
        "POLICY",
        "RULE",
        "REASON",
    ]);
    for p in v["paths"].as_array().into_iter().flatten() {
        t.row(vec![
            s(&p["endpoint"]),
            s(&p["workload"]),
            s(&p["route"]),
            s(&p["mtls_mode"]),
            if p["allowed"] == Value::Bool(true) {
                "ALLOW".into()
            } else {
                "DENY".into()
            },
            s(&p["decision"]["policy"]),
            s(&p["decision"]["rule"]),
            s(&p["reason"]),
        ]);
    }
    out.push_str(&t.render());
    for p in v["paths"].as_array().into_iter().flatten() {
        for note in p["decision"]["dry_run"].as_array().into_iter().flatten() {
            out.push_str(&format!("dry-run: {}\n", s(note)));
        }
    }
    out.push_str(&explain_http(&v["http"]));
    out
}

/// The waypoint's side of `explain`, when a request was asked about.
fn explain_http(h: &Value) -> String {
    if h.is_null() {
        return String::new();
    }
    if let Some(why) = h["not_http"].as_str() {
        return format!("HTTP:    not looked at: {why}\n");
    }
    let backends: Vec<String> = h["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| format!("{} (weight {})", s(&b["service"]), s(&b["weight"])))
        .collect();
    format!(
        "HTTP:    {} {} at waypoint {} for {}:{}\n  token:    {}{}\n  policy:   {}\n  route:    {}\n  backends: {}\n  answer:   {}\n  verdict:  {}\n",
        s(&h["method"]),
        s(&h["path"]),
        s(&h["waypoint"]),
        s(&h["service"]),
        s(&h["port"]),
        s(&h["authentication"]),
        match h["request_principal"].as_str() {
            Some(principal) => format!(" ({principal})"),
            None => String::new(),
        },
        match &h["decision"] {
            Value::Null => "-".into(),
            decision => format!(
                "{} (policy {}, rule {})",
                s(&decision["reason"]),
                s(&decision["policy"]),
                s(&decision["rule"])
            ),
        },
        s(&h["route"]),
        if backends.is_empty() {
            "-".into()
        } else {
            backends.join(", ")
        },
        match h["status"].as_u64() {
            Some(status) => format!("{status} from the waypoint"),
            None => "forwarded to a backend".into(),
        },
        s(&h["summary"]),
    )
}

fn bpf(v: &Value) -> String {
    if v.is_null() {
        return "capture is not active\n".into();
    }
    let mut programs = Table::new(&["PROGRAM", "KIND", "ID", "ATTACHED-TO"]);
    for p in v["programs"].as_array().into_iter().flatten() {
        let attached: Vec<String> = p["attached_to"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        programs.row(vec![
            s(&p["name"]),
            s(&p["kind"]),
            s(&p["id"]),
            if attached.is_empty() {
                "-".into()
            } else {
                attached.join(",")
            },
        ]);
    }
    let mut map = Table::new(&["POD-IP", "IFINDEX", "DEVICE", "ENROLLED"]);
    for w in v["workloads_map"].as_array().into_iter().flatten() {
        map.row(vec![
            s(&w["ip"]),
            s(&w["ifindex"]),
            s(&w["ifname"]),
            s(&w["enrolled"]),
        ]);
    }
    let mut counters = Table::new(&["COUNTER", "VALUE"]);
    for (name, value) in v["counters"].as_object().into_iter().flatten() {
        counters.row(vec![name.clone(), s(value)]);
    }
    format!(
        "Programs:\n{}\nWORKLOADS map:\n{}\nCounters:\n{}\nPolicy route: {}\ncgroup v2: {}\n",
        programs.render(),
        map.render(),
        counters.render(),
        s(&v["capture_route"]),
        s(&v["kernel"]["cgroup2"]),
    )
}
