//! Fuzzes the state file parser and the snapshot built from what it reads: any text, as YAML
//! and as JSON, gives objects and problems, never a panic, and the snapshot is consistent.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use mesh_agent::source::local::document::{self, Format};
use mesh_agent::state::{Records, Snapshot};

fuzz_target!(|data: &[u8]| {
    // The agent reads files with `read_to_string`, so it only ever sees UTF-8; lossy
    // conversion keeps every input useful instead of throwing the invalid ones away.
    let text = String::from_utf8_lossy(data);
    for (file, format) in [("state.yaml", Format::Yaml), ("state.json", Format::Json)] {
        check(Path::new(file), &text, format);
    }
});

fn check(file: &Path, text: &str, format: Format) {
    let parsed = document::parse(file, text, format);
    for error in &parsed.errors {
        // Problems are shown by `mesh-agent status` and the admin API.
        let _ = error.to_string();
    }
    let files = vec![PathBuf::from(file)];
    // As the Kubernetes source takes objects: each bad one rejected alone, the rest kept.
    let (snapshot, errors) = Snapshot::assemble(parsed.objects.clone(), files.clone());
    for error in &errors {
        let _ = error.to_string();
    }
    // As the directory source takes them: the whole state, or every problem.
    let built = Snapshot::build(parsed.objects.clone(), files.clone());
    match &built {
        Ok(whole) => {
            assert!(errors.is_empty(), "build accepted what assemble rejected");
            assert_eq!(whole, &snapshot, "build and assemble disagree");
        }
        Err(problems) => assert!(!problems.is_empty(), "build failed without a problem"),
    }
    // Rejoining the same records with the snapshot as the previous one (what the Kubernetes
    // source does on every change) gives the same snapshot and the same problems.
    let (records, mut read_errors) = Records::read(parsed.objects);
    let (rejoined, join_errors) = Snapshot::join(&records, files, &snapshot);
    read_errors.extend(join_errors);
    assert_eq!(
        rejoined, snapshot,
        "a rebuild from the same objects differs"
    );
    assert_eq!(read_errors, errors, "a rebuild reports other problems");
    lookups(&snapshot);
    // `/config_dump` and `mesh-agent state` serve the snapshot as JSON.
    let _ = serde_json::to_string(&snapshot).expect("a snapshot serializes");
}

/// The lookups the proxy makes on every connection, over everything the snapshot holds.
fn lookups(snapshot: &Snapshot) {
    for workload in &snapshot.workloads {
        let by_ip = snapshot.workload_by_ip(workload.ip);
        if workload.owns_ip() {
            assert!(
                by_ip.is_some(),
                "workload {} not found by its IP",
                workload.name
            );
        }
        assert!(
            snapshot
                .workload(&workload.namespace, &workload.name)
                .is_some()
        );
        let _ = snapshot.workloads_on_node(&workload.node).count();
    }
    for service in &snapshot.services {
        if let Some(ip) = service.cluster_ip {
            assert!(
                snapshot.service_by_ip(ip).is_some(),
                "service not found by its IP"
            );
        }
        for endpoint in snapshot.endpoints(service) {
            assert_eq!(
                endpoint.namespace, service.namespace,
                "endpoint in another namespace"
            );
        }
        let _ = snapshot.slices_of(service).count();
    }
}
