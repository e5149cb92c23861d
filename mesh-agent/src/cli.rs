//! The inspection commands (`status`, `workloads`, `connections`, `bpf`): fetch a view from the
//! admin API and print it as a table, or as the same JSON with `-o json`.

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

#[derive(Debug, Clone, Copy)]
pub enum View {
    Status,
    Workloads,
    Connections,
    Bpf,
}

impl View {
    fn path(self) -> &'static str {
        match self {
            View::Status => "/status",
            View::Workloads => "/workloads",
            View::Connections => "/connections",
            View::Bpf => "/bpf",
        }
    }
}

pub async fn show(admin: SocketAddr, view: View, output: Output) -> anyhow::Result<String> {
    let value = client::get(admin, view.path()).await?;
    Ok(match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&value)?),
        Output::Table => match view {
            View::Status => status(&value),
            View::Workloads => workloads(&value),
            View::Connections => connections(&value),
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
    line("Capture active:", s(&capture["active"]));
    line(
        "Enrolled on node:",
        format!("{} ({} captured)", s(&capture["enrolled_on_node"]), s(&capture["captured"])),
    );
    if let Some(pending) = capture["pending"].as_object() {
        for (ip, reason) in pending {
            line("Pending:", format!("{ip}: {}", s(reason)));
        }
    }
    line("Open connections:", s(&v["connections"]["open"]));
    line(
        "Connections total:",
        format!(
            "{} outbound, {} inbound, {} closed, {} failed",
            s(&totals["outbound_opened"]),
            s(&totals["inbound_opened"]),
            s(&totals["closed"]),
            s(&totals["failed"])
        ),
    );
    out
}

fn workloads(v: &Value) -> String {
    let mut t = Table::new(&["NAMESPACE", "NAME", "NODE", "IP", "SERVICE-ACCOUNT", "ENROLLED", "CAPTURE", "REASON"]);
    for w in v.as_array().into_iter().flatten() {
        t.row(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            s(&w["node"]),
            s(&w["ip"]),
            s(&w["service_account"]),
            if w["enrolled"] == Value::Bool(true) { "yes".into() } else { "no".into() },
            s(&w["capture_device"]),
            s(&w["reason"]),
        ]);
    }
    t.render()
}

fn connection_rows(t: &mut Table, list: &Value, state: &str) {
    for c in list.as_array().into_iter().flatten() {
        let state = match (&c["error"], state) {
            (Value::String(e), _) => format!("failed: {e}"),
            (_, state) => state.to_string(),
        };
        t.row(vec![
            s(&c["id"]),
            s(&c["direction"]),
            s(&c["source"]),
            s(&c["source_workload"]),
            s(&c["original_destination"]),
            s(&c["destination_workload"]),
            s(&c["route"]),
            s(&c["bytes_sent"]),
            s(&c["bytes_received"]),
            state,
        ]);
    }
}

fn connections(v: &Value) -> String {
    let mut t = Table::new(&[
        "ID", "DIRECTION", "SOURCE", "SOURCE-WORKLOAD", "DESTINATION", "DESTINATION-WORKLOAD", "ROUTE", "SENT",
        "RECEIVED", "STATE",
    ]);
    connection_rows(&mut t, &v["open"], "open");
    connection_rows(&mut t, &v["recent"], "closed");
    let totals = &v["totals"];
    format!(
        "{}\n{} outbound, {} inbound opened; {} closed ({} failed); {} bytes sent, {} received\n",
        t.render(),
        s(&totals["outbound_opened"]),
        s(&totals["inbound_opened"]),
        s(&totals["closed"]),
        s(&totals["failed"]),
        s(&totals["bytes_sent"]),
        s(&totals["bytes_received"]),
    )
}

fn bpf(v: &Value) -> String {
    if v.is_null() {
        return "capture is not active\n".into();
    }
    let mut programs = Table::new(&["PROGRAM", "KIND", "ID", "ATTACHED-TO"]);
    for p in v["programs"].as_array().into_iter().flatten() {
        let attached: Vec<String> =
            p["attached_to"].as_array().into_iter().flatten().map(s).collect();
        programs.row(vec![
            s(&p["name"]),
            s(&p["kind"]),
            s(&p["id"]),
            if attached.is_empty() { "-".into() } else { attached.join(",") },
        ]);
    }
    let mut map = Table::new(&["POD-IP", "IFINDEX", "DEVICE", "ENROLLED"]);
    for w in v["workloads_map"].as_array().into_iter().flatten() {
        map.row(vec![s(&w["ip"]), s(&w["ifindex"]), s(&w["ifname"]), s(&w["enrolled"])]);
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
