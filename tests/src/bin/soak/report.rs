//! The end of a soak: every check on the tally, the server's counts, the agents' own
//! counters and their memory, printed one per line, then the summary line with PASS or FAIL.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::Duration};

use crate::{
    Settings,
    flows::Tally,
    samples::{self, Sample, Verdict},
    server,
};

/// Everything the verdict looks at.
pub struct Report<'a> {
    pub settings: Settings,
    pub tally: &'a Tally,
    /// What the server carried during the soak (the probe's share taken out).
    pub server: server::Report,
    /// The server's first error messages.
    pub server_errors: Vec<String>,
    /// How node 0's agent routed its most recent closed connections to the server.
    pub routes: BTreeMap<String, usize>,
    pub agents_running: Vec<bool>,
    pub before: &'a [serde_json::Value; 2],
    pub after: &'a [serde_json::Value; 2],
    pub table: &'a [Sample],
}

impl Report<'_> {
    /// Prints the checks and the summary line; whether all passed.
    pub fn print(&self) -> bool {
        let t = self.tally;
        let n = self.settings.connections;
        let load = |c: &std::sync::atomic::AtomicUsize| c.load(Ordering::SeqCst);
        let (sent, echoed) = (
            t.sent.load(Ordering::SeqCst),
            t.echoed.load(Ordering::SeqCst),
        );
        let lost = sent.saturating_sub(echoed);
        let (received, written) = (self.server.received, self.server.written);
        let verdicts = self.memory();
        let mut checks: Vec<(bool, String)> = vec![
            (
                load(&t.opened) == n && load(&t.connect_failed) == 0,
                format!(
                    "{} of {n} connections opened, {} failed to connect",
                    load(&t.opened),
                    load(&t.connect_failed)
                ),
            ),
            (
                self.server.accepted == load(&t.opened),
                format!("the server accepted {} connections", self.server.accepted),
            ),
            (
                t.failures() == 0,
                format!(
                    "connection failures: {} reset/broken, {} stalled, {} mismatched, {} truncated",
                    load(&t.broken),
                    load(&t.stalled),
                    load(&t.mismatched),
                    load(&t.truncated)
                ),
            ),
            (
                load(&t.closed_clean) == n && self.server.closed_clean == n,
                format!(
                    "closed cleanly: {} by the clients (half-close, all echoed, then EOF), {} by the server",
                    load(&t.closed_clean),
                    self.server.closed_clean
                ),
            ),
            (
                lost == 0 && sent == received && sent == written,
                format!(
                    "bytes: {sent} sent in {} chunks, {echoed} echoed intact, {lost} lost; the server read {received} and wrote {written}",
                    t.chunks.load(Ordering::SeqCst)
                ),
            ),
            (
                self.server.errors == 0,
                format!("server errors: {}", self.server.errors),
            ),
            (
                self.agents_running.iter().all(|r| *r),
                format!("agents still running at the end: {:?}", self.agents_running),
            ),
        ];
        for node in 0..2 {
            checks.push(self.agent_check(node));
        }
        checks.push((
            self.routes.keys().all(|r| r == "tunnel") && !self.routes.is_empty(),
            format!(
                "routes of node 0's last closed connections to the server: {:?}",
                self.routes
            ),
        ));
        for (node, verdict) in verdicts.iter().enumerate() {
            checks.push(match verdict {
                Some(v) => (v.flat, format!("node {node} memory: {}", v.describe())),
                None => (false, format!("node {node} memory: run too short to judge")),
            });
        }
        println!();
        println!("memory rule: {}", samples::rule());
        println!(
            "slowest echo of a chunk: {:.1} ms",
            t.slowest_echo_us.load(Ordering::SeqCst) as f64 / 1000.0
        );
        for (ok, line) in &checks {
            println!("  [{}] {line}", if *ok { " ok " } else { "FAIL" });
        }
        for error in t.errors().iter().chain(&self.server_errors) {
            println!("  error: {error}");
        }
        let pass = checks.iter().all(|(ok, _)| *ok);
        println!("{}", self.summary(lost, &verdicts, pass));
        pass
    }

    /// The agent held every connection and let go of all of them: no failure or denial counted
    /// during the soak, nothing refused by a limit, no connection open once all closed.
    fn agent_check(&self, node: usize) -> (bool, String) {
        let (before, after) = (&self.before[node], &self.after[node]);
        if after.is_null() {
            return (false, format!("node {node} agent: no status at the end"));
        }
        let total = |v: &serde_json::Value, key: &str| {
            v["connections"]["totals"][key].as_u64().unwrap_or(0)
        };
        let moved = |key: &str| total(after, key).saturating_sub(total(before, key));
        let refused = &after["limits"]["proxy"]["refused"];
        let nothing_refused = refused.as_object().is_none_or(|r| r.is_empty());
        let open = &after["connections"]["open"];
        let n = self.settings.connections as u64;
        let opened = if node == 0 {
            moved("outbound_opened")
        } else {
            moved("inbound_opened")
        };
        let ok = opened == n
            && moved("closed") == n
            && moved("failed") == 0
            && moved("denied") == 0
            && nothing_refused
            && *open == 0;
        (
            ok,
            format!(
                "node {node} agent: {} outbound and {} inbound connections opened, {} closed, {} failed, {} denied during the soak; refused by limits {refused}; {open} open after the close, {} tunnels",
                moved("outbound_opened"),
                moved("inbound_opened"),
                moved("closed"),
                moved("failed"),
                moved("denied"),
                after["connections"]["tunnels"],
            ),
        )
    }

    fn memory(&self) -> [Option<Verdict>; 2] {
        let total = self.table.last().map_or(Duration::ZERO, |s| s.elapsed);
        let of = |node: usize| {
            let rss: Vec<(Duration, u64)> = self
                .table
                .iter()
                .filter_map(|s| s.agents[node].rss_kib.map(|k| (s.elapsed, k)))
                .collect();
            samples::judge(&rss, total)
        };
        [of(0), of(1)]
    }

    fn summary(&self, lost: u64, verdicts: &[Option<Verdict>; 2], pass: bool) -> String {
        let rss = |v: &Option<Verdict>| {
            v.as_ref().map_or("?".into(), |v| {
                format!(
                    "{:.1} -> {:.1} MiB",
                    v.baseline_kib / 1024.0,
                    v.last_kib / 1024.0
                )
            })
        };
        format!(
            "soak: {} connections for {} s: {:.1} MiB echoed, {lost} bytes lost, {} failures; agent RSS node 0 {}, node 1 {}: {}",
            self.settings.connections,
            self.table.last().map_or(0, |s| s.elapsed.as_secs()),
            self.tally.echoed.load(Ordering::SeqCst) as f64 / (1024.0 * 1024.0),
            self.tally.failures(),
            rss(&verdicts[0]),
            rss(&verdicts[1]),
            if pass { "PASS" } else { "FAIL" }
        )
    }
}
