//! Kernel capture: loads the eBPF programs, attaches them to the host-side veths of enrolled
//! pods, and keeps the `WORKLOADS` map in step with the node's enrolled pods.
//!
//! Every attachment is a bpf_link held by this process (TCX on the veths, a cgroup link for
//! sock_ops), so if the agent dies the kernel detaches them; only the policy route outlives a
//! crash, and `mesh-agent cleanup` removes it.

pub mod capabilities;
pub mod kernel;
pub mod reconcile;
pub mod route_table;
pub mod routing;
pub mod sysctl;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::Ipv4Addr,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, ProgramError, SchedClassifier, SockOps, TcAttachType,
        sock_ops::SockOpsLinkId, tc::SchedClassifierLinkId,
    },
};
use mesh_common::{CaptureConfig, WORKLOAD_ENROLLED, Workload, counter};
use serde::Serialize;
use tracing::{debug, info};

use self::{kernel::KernelFeatures, routing::PodLink};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

pub const PROG_INGRESS: &str = "capture_ingress";
pub const PROG_EGRESS: &str = "capture_egress";
pub const PROG_UPLINK: &str = "capture_uplink";
pub const PROG_SOCKOPS: &str = "observe_sockops";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error("loading the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("eBPF program {name} is missing from the object")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing from the object or has the wrong type")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name}: {summary}")]
    Program { name: &'static str, summary: String },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup v2 root {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Routing(#[from] routing::RoutingError),
    #[error(transparent)]
    Sysctl(#[from] sysctl::SysctlError),
}

/// Turns a program error into one readable line; the verifier log goes to debug output only.
fn program_error(name: &'static str, err: ProgramError) -> CaptureError {
    let summary = match &err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            debug!(program = name, log = %verifier_log, "verifier log");
            format!(
                "the kernel refused to load it ({io_error}); the kernel may be too old or lack a feature (run with RUST_LOG=debug for the verifier log)"
            )
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    };
    CaptureError::Program { name, summary }
}

/// The TCX links on one device.
struct DeviceLinks {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
    pods: BTreeSet<Ipv4Addr>,
}

pub struct Capture {
    ebpf: Ebpf,
    workloads: HashMap<MapData, u32, Workload>,
    counters: PerCpuArray<MapData, u64>,
    devices: BTreeMap<String, DeviceLinks>,
    /// Node uplinks with `capture_uplink` attached (ingress), by name: (ifindex, link).
    uplinks: BTreeMap<String, (u32, SchedClassifierLinkId)>,
    /// Why the uplinks could not be found last time, so the same problem is logged once.
    uplink_problem: Problem,
    /// Why attaching to an uplink failed last time, by device, likewise.
    uplink_attach_problems: BTreeMap<String, Problem>,
    pods: BTreeMap<Ipv4Addr, PodLink>,
    sockops_link: Option<SockOpsLinkId>,
    features: KernelFeatures,
    early_demux: Option<sysctl::Changed>,
}

/// The last problem of a periodic task, so a lasting one is logged once, not every period.
#[derive(Debug, Default)]
struct Problem(Option<String>);

impl Problem {
    /// Records `problem`; true when it differs from the last one.
    fn report(&mut self, problem: String) -> bool {
        let new = self.0.as_deref() != Some(problem.as_str());
        self.0 = Some(problem);
        new
    }

    /// Forgets the problem; true when there was one.
    fn clear(&mut self) -> bool {
        self.0.take().is_some()
    }
}

/// What `mesh-agent bpf` shows.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureStatus {
    pub kernel: KernelFeatures,
    pub programs: Vec<ProgramStatus>,
    pub workloads_map: Vec<WorkloadEntry>,
    pub counters: BTreeMap<String, u64>,
    pub capture_route: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub kind: String,
    pub id: Option<u32>,
    pub attached_to: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadEntry {
    pub ip: Ipv4Addr,
    pub ifindex: u32,
    pub ifname: Option<String>,
    pub enrolled: bool,
}

fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl Capture {
    /// Loads the programs and maps, attaches sock_ops to the cgroup v2 root and installs the
    /// policy route. Veths are attached later, per enrolled pod, by [`Capture::enroll`].
    pub fn load(features: KernelFeatures) -> Result<Self, CaptureError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(CaptureError::Object)?;

        let mut config: Array<MapData, CaptureConfig> = take_map(&mut ebpf, "CONFIG")?;
        config
            .set(0, &CaptureConfig::default_ports(), 0)
            .map_err(|source| CaptureError::Map {
                name: "CONFIG",
                source,
            })?;
        let workloads = take_map(&mut ebpf, "WORKLOADS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;

        for name in [PROG_INGRESS, PROG_EGRESS, PROG_UPLINK] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| program_error(name, e))?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
        sockops.load().map_err(|e| program_error(PROG_SOCKOPS, e))?;
        let cgroup = File::open(&features.cgroup2).map_err(|source| CaptureError::Cgroup {
            path: features.cgroup2.display().to_string(),
            source,
        })?;
        // A bpf_link attachment always coexists with other programs on the cgroup (the kernel
        // rejects ALLOW_MULTI flags on link_create), so "Single" here is not exclusive.
        let sockops_link = sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| program_error(PROG_SOCKOPS, e))?;

        let early_demux = sysctl::change(sysctl::EARLY_DEMUX, "0")?;
        if let Err(e) = routing::install_capture_route() {
            if let Some(changed) = early_demux {
                let _ = changed.restore();
            }
            return Err(e.into());
        }
        info!(cgroup = %features.cgroup2.display(), "capture programs loaded");
        Ok(Self {
            ebpf,
            workloads,
            counters,
            devices: BTreeMap::new(),
            uplinks: BTreeMap::new(),
            uplink_problem: Problem::default(),
            uplink_attach_problems: BTreeMap::new(),
            pods: BTreeMap::new(),
            sockops_link: Some(sockops_link),
            features,
            early_demux,
        })
    }

    /// Starts capturing the pod at `ip`, whose host-side device is `link`.
    pub fn enroll(&mut self, ip: Ipv4Addr, link: PodLink) -> Result<(), CaptureError> {
        if self.pods.get(&ip) == Some(&link) {
            return Ok(());
        }
        if self.pods.contains_key(&ip) {
            // The pod's veth changed (pod recreated): start over on the new one.
            self.release(ip)?;
        }
        let stale = self
            .devices
            .get(&link.ifname)
            .is_some_and(|d| d.ifindex != link.ifindex);
        if stale {
            self.detach_device(&link.ifname);
        }
        if !self.devices.contains_key(&link.ifname) {
            let ingress = self.attach(PROG_INGRESS, link.ifindex, TcAttachType::Ingress)?;
            let egress = match self.attach(PROG_EGRESS, link.ifindex, TcAttachType::Egress) {
                Ok(id) => id,
                Err(e) => {
                    let _ = program::<SchedClassifier>(&mut self.ebpf, PROG_INGRESS)
                        .map(|p| p.detach(ingress));
                    return Err(e);
                }
            };
            self.devices.insert(
                link.ifname.clone(),
                DeviceLinks {
                    ifindex: link.ifindex,
                    ingress,
                    egress,
                    pods: BTreeSet::new(),
                },
            );
        }
        let entry = Workload {
            flags: WORKLOAD_ENROLLED,
            ifindex: link.ifindex,
        };
        self.workloads
            .insert(&key(ip), &entry, 0)
            .map_err(|source| CaptureError::Map {
                name: "WORKLOADS",
                source,
            })?;
        if let Some(device) = self.devices.get_mut(&link.ifname) {
            device.pods.insert(ip);
        }
        info!(pod_ip = %ip, device = %link.ifname, "capture enabled");
        self.pods.insert(ip, link);
        Ok(())
    }

    /// Stops capturing the pod at `ip`; detaches from its device when no other pod uses it.
    pub fn release(&mut self, ip: Ipv4Addr) -> Result<(), CaptureError> {
        let Some(link) = self.pods.remove(&ip) else {
            return Ok(());
        };
        match self.workloads.remove(&key(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(CaptureError::Map {
                    name: "WORKLOADS",
                    source,
                });
            }
        }
        let unused = self.devices.get_mut(&link.ifname).is_some_and(|d| {
            d.pods.remove(&ip);
            d.pods.is_empty()
        });
        if unused {
            self.detach_device(&link.ifname);
        }
        info!(pod_ip = %ip, device = %link.ifname, "capture disabled");
        Ok(())
    }

    /// Pods currently captured, with their devices.
    pub fn enrolled(&self) -> impl Iterator<Item = (&Ipv4Addr, &PodLink)> {
        self.pods.iter()
    }

    fn attach(
        &mut self,
        name: &'static str,
        ifindex: u32,
        direction: TcAttachType,
    ) -> Result<SchedClassifierLinkId, CaptureError> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        prog.attach(ifindex, direction)
            .map_err(|e| program_error(name, e))
    }

    fn detach_device(&mut self, ifname: &str) {
        let Some(device) = self.devices.remove(ifname) else {
            return;
        };
        // A device that vanished (pod deleted) took its links with it; errors are expected then.
        if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, PROG_INGRESS) {
            let _ = p.detach(device.ingress);
        }
        if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, PROG_EGRESS) {
            let _ = p.detach(device.egress);
        }
        debug!(device = ifname, "capture detached");
    }

    /// Records that the uplinks could not be found (the attached ones stay); true when this
    /// problem is new, so the caller logs it once rather than on every reconcile.
    pub fn uplinks_unknown(&mut self, problem: String) -> bool {
        self.uplink_problem.report(problem)
    }

    /// Attaches `capture_uplink` to exactly these devices (name → ifindex), detaching it from
    /// others. Replies from other nodes to the proxy's sockets, and tunnels to enrolled pods,
    /// then reach the proxy on arrival instead of after a detour through the pod's veth.
    pub fn set_uplinks(&mut self, wanted: &BTreeMap<String, u32>) {
        if self.uplink_problem.clear() {
            info!("uplinks found again");
        }
        let stale: Vec<String> = self
            .uplinks
            .iter()
            .filter(|(name, (ifindex, _))| wanted.get(*name) != Some(ifindex))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some((_, link)) = self.uplinks.remove(&name)
                && let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, PROG_UPLINK)
            {
                let _ = p.detach(link);
            }
            info!(device = %name, "uplink capture detached");
        }
        self.uplink_attach_problems
            .retain(|name, _| wanted.contains_key(name));
        for (name, ifindex) in wanted {
            if self.uplinks.contains_key(name) {
                continue;
            }
            match self.attach(PROG_UPLINK, *ifindex, TcAttachType::Ingress) {
                Ok(link) => {
                    info!(device = %name, "uplink capture attached");
                    self.uplink_attach_problems.remove(name);
                    self.uplinks.insert(name.clone(), (*ifindex, link));
                }
                Err(e) => {
                    // Retried every reconcile; the same failure is logged once.
                    let problem = self.uplink_attach_problems.entry(name.clone()).or_default();
                    if problem.report(e.to_string()) {
                        tracing::warn!(device = %name, error = %e, "attaching to the uplink failed; traffic from other nodes takes the detour through the pods' veths");
                    }
                }
            }
        }
    }

    /// Sum of each counter over all CPUs.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        counter::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = self
                    .counters
                    .get(&(i as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                ((*name).to_string(), total)
            })
            .collect()
    }

    pub fn status(&self) -> CaptureStatus {
        let mut programs = Vec::new();
        for (name, kind) in [
            (PROG_INGRESS, "tc ingress (tcx)"),
            (PROG_EGRESS, "tc egress (tcx)"),
            (PROG_UPLINK, "tc ingress (tcx), uplink"),
            (PROG_SOCKOPS, "sock_ops"),
        ] {
            let id = self
                .ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|info| info.id());
            let attached_to = match name {
                PROG_SOCKOPS => self
                    .sockops_link
                    .iter()
                    .map(|_| self.features.cgroup2.display().to_string())
                    .collect(),
                PROG_UPLINK => self.uplinks.keys().cloned().collect(),
                _ => self.devices.keys().cloned().collect(),
            };
            programs.push(ProgramStatus {
                name: name.into(),
                kind: kind.into(),
                id,
                attached_to,
            });
        }
        let names: BTreeMap<u32, &str> = self
            .pods
            .values()
            .map(|l| (l.ifindex, l.ifname.as_str()))
            .collect();
        let workloads_map = self
            .workloads
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| WorkloadEntry {
                ip: Ipv4Addr::from(k.to_ne_bytes()),
                ifindex: v.ifindex,
                ifname: names.get(&v.ifindex).map(|s| (*s).to_string()),
                enrolled: v.flags & WORKLOAD_ENROLLED != 0,
            })
            .collect();
        CaptureStatus {
            kernel: self.features.clone(),
            programs,
            workloads_map,
            counters: self.counters(),
            capture_route: format!(
                "fwmark {:#x}/{:#x} lookup {} (local 0.0.0.0/0 dev lo)",
                mesh_common::CAPTURE_MARK,
                mesh_common::CAPTURE_MARK_MASK,
                mesh_common::CAPTURE_ROUTE_TABLE
            ),
        }
    }

    /// Detaches everything and removes the policy route.
    pub fn shutdown(mut self) -> Result<(), CaptureError> {
        let ifnames: Vec<String> = self.devices.keys().cloned().collect();
        for ifname in ifnames {
            self.detach_device(&ifname);
        }
        self.set_uplinks(&BTreeMap::new());
        if let Some(link) = self.sockops_link.take()
            && let Ok(p) = program::<SockOps>(&mut self.ebpf, PROG_SOCKOPS)
        {
            let _ = p.detach(link);
        }
        let route = routing::remove_capture_route();
        let demux = self
            .early_demux
            .take()
            .map(sysctl::Changed::restore)
            .transpose();
        drop(self.ebpf);
        route?;
        demux?;
        info!("capture removed");
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(CaptureError::MissingProgram { name })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map>,
{
    ebpf.take_map(name)
        .and_then(|m| T::try_from(m).ok())
        .ok_or(CaptureError::MissingMap { name })
}

#[cfg(test)]
mod tests {
    use super::Problem;

    #[test]
    fn a_lasting_problem_is_reported_once() {
        let mut problem = Problem::default();
        assert!(!problem.clear());
        assert!(problem.report("ip failed".into()));
        assert!(!problem.report("ip failed".into()));
        assert!(problem.report("ip printed nonsense".into()));
        assert!(problem.clear());
        assert!(problem.report("ip printed nonsense".into()));
    }
}
