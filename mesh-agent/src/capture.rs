//! Kernel capture: loads the eBPF programs, attaches them to the host-side veths of enrolled
//! pods, and keeps the `WORKLOADS` map in step with the node's enrolled pods.
//!
//! Every attachment is a bpf_link (TCX on the veths and uplinks, a cgroup link for sock_ops)
//! pinned with the maps under the node's pin directory (`lifecycle::pins`), so capture outlives
//! the process: the programs fail closed while no agent listens, and the next agent adopts the
//! pins. Only `mesh-agent uninstall` removes them.

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
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, ProgramError, SchedClassifier, SockOps, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
    },
};
use mesh_common::{
    CaptureConfig, DATAPLANE_LAYOUT, DataPlaneMeta, WORKLOAD_ENROLLED, Workload, counter,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use self::{kernel::KernelFeatures, routing::PodLink};
use crate::lifecycle::pins::{self, DataPlaneStatus, LinkPin, PinDir, Pinned, Role};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

pub const PROG_INGRESS: &str = "capture_ingress";
pub const PROG_EGRESS: &str = "capture_egress";
pub const PROG_UPLINK: &str = "capture_uplink";
pub const PROG_SOCKOPS: &str = "observe_sockops";
/// Every map of the object; all are pinned.
const MAPS: [&str; 4] = ["CONFIG", "WORKLOADS", "COUNTERS", "META"];

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
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    #[error("pinning link {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
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
    ingress: Pinned,
    egress: Pinned,
    pods: BTreeSet<Ipv4Addr>,
}

pub struct Capture {
    ebpf: Ebpf,
    workloads: HashMap<MapData, u32, Workload>,
    counters: PerCpuArray<MapData, u64>,
    devices: BTreeMap<String, DeviceLinks>,
    /// Node uplinks with `capture_uplink` attached (ingress), by name: (ifindex, link).
    uplinks: BTreeMap<String, (u32, Pinned)>,
    /// Why the uplinks could not be found last time, so the same problem is logged once.
    uplink_problem: Problem,
    /// Why attaching to an uplink failed last time, by device, likewise.
    uplink_attach_problems: BTreeMap<String, Problem>,
    /// Why a captured pod's device could not be looked up last time, likewise.
    lookup_problem: Problem,
    pods: BTreeMap<Ipv4Addr, PodLink>,
    sockops_link: Option<Pinned>,
    features: KernelFeatures,
    pins: PinDir,
    /// TCX links pinned by an earlier agent and not yet moved onto this agent's programs: each
    /// is taken over when reconcile wants its device, the rest go in [`Capture::adopted`].
    adopted: BTreeMap<(u32, Role), PinnedLink>,
    dataplane: DataPlaneStatus,
    handover_token: String,
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
    /// The pinned data plane: where, which layout, since when, adopted or created.
    pub dataplane: DataPlaneStatus,
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
    /// Loads the programs against the node's pinned maps (created and pinned when there are
    /// none of this layout), attaches sock_ops to the cgroup v2 root and installs the policy
    /// route. Veths are attached later, per enrolled pod, by [`Capture::enroll`]; links pinned by
    /// an earlier agent are taken over then, one atomic program swap each.
    pub fn load(features: KernelFeatures, pins: PinDir) -> Result<Self, CaptureError> {
        let found = pins.meta().exists();
        pins.create()?;
        let maps_dir = pins.maps();
        let paths: Vec<(&str, PathBuf)> = MAPS
            .iter()
            .map(|name| {
                let path = if *name == "META" {
                    pins.meta()
                } else {
                    maps_dir.join(name)
                };
                (*name, path)
            })
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(CaptureError::Object)?;

        let mut config: Array<MapData, CaptureConfig> = take_map(&mut ebpf, "CONFIG")?;
        config
            .set(0, &CaptureConfig::default_ports(), 0)
            .map_err(|source| CaptureError::Map {
                name: "CONFIG",
                source,
            })?;
        let workloads = take_map(&mut ebpf, "WORKLOADS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let mut meta_map: Array<MapData, DataPlaneMeta> = take_map(&mut ebpf, "META")?;
        let map_error = |source| CaptureError::Map {
            name: "META",
            source,
        };
        let previous = meta_map.get(&0, 0).map_err(map_error)?;
        let adopted = found && previous.pinned_since != 0;

        for name in [PROG_INGRESS, PROG_EGRESS, PROG_UPLINK] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(|e| program_error(name, e))?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
        sockops.load().map_err(|e| program_error(PROG_SOCKOPS, e))?;

        // Early demux is off while capture is in place. The value to restore is recorded once,
        // by the agent that first turned it off, before it does, and kept across restarts for
        // uninstall.
        let demux = sysctl::get(sysctl::EARLY_DEMUX)?;
        let early_demux_before = if adopted {
            previous.early_demux_before
        } else {
            demux.parse::<u32>().map_or(0, |v| v + 1)
        };
        let now = pins::now_unix();
        let version = pins::version_bytes(env!("CARGO_PKG_VERSION"));
        let meta = DataPlaneMeta {
            layout: DATAPLANE_LAYOUT,
            early_demux_before,
            pinned_since: if adopted { previous.pinned_since } else { now },
            adopted_at: now,
            created_by: if adopted {
                previous.created_by
            } else {
                version
            },
            adopted_by: version,
            handover_token: rand::random(),
        };
        meta_map.set(0, &meta, 0).map_err(map_error)?;
        if demux != "0" {
            sysctl::set(sysctl::EARLY_DEMUX, "0")?;
        }
        routing::install_capture_route()?;

        let mut adopted_links = BTreeMap::new();
        let mut old_sockops = Vec::new();
        for (pin, path) in pins.pinned_links() {
            let link = match PinnedLink::from_pin(&path) {
                Ok(link) => link,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "a pinned link cannot be opened; removing it");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            match pin {
                LinkPin::Tcx { ifindex, role } => {
                    adopted_links.insert((ifindex, role), link);
                }
                LinkPin::SockOps { .. } => old_sockops.push(Pinned {
                    path,
                    link: link.into(),
                }),
            }
        }
        let cgroup = File::open(&features.cgroup2).map_err(|source| CaptureError::Cgroup {
            path: features.cgroup2.display().to_string(),
            source,
        })?;
        // A bpf_link attachment always coexists with other programs on the cgroup (the kernel
        // rejects ALLOW_MULTI flags on link_create), so "Single" here is not exclusive. sock_ops
        // only counts, so the new link goes in before the adopted one goes out.
        let sockops: &mut SockOps = program(&mut ebpf, PROG_SOCKOPS)?;
        let id = sockops
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|e| program_error(PROG_SOCKOPS, e))?;
        let link = fd_link(sockops.take_link(id), PROG_SOCKOPS, &pins.links())?;
        let link_id = link.info().map(|i| i.id()).unwrap_or_default();
        let sockops_link = pin_link(link, pins.link(LinkPin::SockOps { id: link_id }))?;
        for old in old_sockops {
            old.remove();
        }

        info!(
            cgroup = %features.cgroup2.display(),
            pins = %pins.root().display(),
            adopted,
            links = adopted_links.len(),
            "capture programs loaded"
        );
        let dataplane = DataPlaneStatus::new(&pins, &meta, adopted);
        Ok(Self {
            ebpf,
            workloads,
            counters,
            devices: BTreeMap::new(),
            uplinks: BTreeMap::new(),
            uplink_problem: Problem::default(),
            uplink_attach_problems: BTreeMap::new(),
            lookup_problem: Problem::default(),
            pods: BTreeMap::new(),
            sockops_link: Some(sockops_link),
            features,
            pins,
            adopted: adopted_links,
            dataplane,
            handover_token: pins::token_text(&meta.handover_token),
        })
    }

    /// Ends the take-over of an earlier agent's data plane, after the first reconcile: links it
    /// pinned that no enrolled pod or uplink wanted are removed, and so are map entries of pods
    /// that are no longer enrolled and maps of other layouts.
    pub fn adopted(&mut self) {
        for ((ifindex, role), link) in std::mem::take(&mut self.adopted) {
            debug!(
                ifindex,
                ?role,
                "removing a pinned link nothing wants any more"
            );
            Pinned {
                path: self.pins.link(LinkPin::Tcx { ifindex, role }),
                link: link.into(),
            }
            .remove();
        }
        let stale: Vec<u32> = self
            .workloads
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !self.pods.contains_key(&Ipv4Addr::from(k.to_ne_bytes())))
            .collect();
        for key in stale {
            let _ = self.workloads.remove(&key);
        }
        for dir in self.pins.other_layouts() {
            info!(path = %dir.display(), "removing the maps of another layout");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    pub fn dataplane(&self) -> &DataPlaneStatus {
        &self.dataplane
    }

    /// What a successor must present to take this agent's listeners over.
    pub fn handover_token(&self) -> &str {
        &self.handover_token
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
        let entry = Workload {
            flags: WORKLOAD_ENROLLED,
            ifindex: link.ifindex,
        };
        let insert = |workloads: &mut HashMap<MapData, u32, Workload>| {
            workloads
                .insert(&key(ip), &entry, 0)
                .map_err(|source| CaptureError::Map {
                    name: "WORKLOADS",
                    source,
                })
        };
        // A device taken over from an earlier agent keeps capturing throughout: the entry goes
        // into this agent's map before its programs replace the old ones on the links. A new
        // device gets its entry only once both programs are attached.
        let taken_over = self.adopted.contains_key(&(link.ifindex, Role::Ingress));
        if taken_over {
            insert(&mut self.workloads)?;
        }
        if !self.devices.contains_key(&link.ifname) {
            let ingress = self.attach(PROG_INGRESS, link.ifindex, Role::Ingress)?;
            let egress = match self.attach(PROG_EGRESS, link.ifindex, Role::Egress) {
                Ok(link) => link,
                Err(e) => {
                    ingress.remove();
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
        if !taken_over {
            insert(&mut self.workloads)?;
        }
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

    /// Attaches program `name` to a device (TCX) and pins the link; a link an earlier agent
    /// pinned there is taken over instead, by swapping its program atomically.
    fn attach(
        &mut self,
        name: &'static str,
        ifindex: u32,
        role: Role,
    ) -> Result<Pinned, CaptureError> {
        let path = self.pins.link(LinkPin::Tcx { ifindex, role });
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if let Some(old) = self.adopted.remove(&(ifindex, role)) {
            let swapped = SchedClassifierLink::try_from(FdLink::from(old))
                .map_err(|e| e.to_string())
                .and_then(|link| prog.attach_to_link(link).map_err(|e| e.to_string()))
                .and_then(|id| prog.take_link(id).map_err(|e| e.to_string()))
                .and_then(|link| FdLink::try_from(link).map_err(|e| e.to_string()));
            match swapped {
                Ok(link) => {
                    debug!(ifindex, ?role, "took over a pinned link");
                    return Ok(Pinned { path, link });
                }
                // Its device went away (the link is defunct): attach afresh below.
                Err(reason) => debug!(ifindex, ?role, reason, "a pinned link cannot be taken over"),
            }
        }
        let direction = match role {
            Role::Egress => TcAttachType::Egress,
            Role::Ingress | Role::Uplink => TcAttachType::Ingress,
        };
        let id = prog
            .attach(ifindex, direction)
            .map_err(|e| program_error(name, e))?;
        let link = fd_link(prog.take_link(id), name, &path)?;
        pin_link(link, path)
    }

    fn detach_device(&mut self, ifname: &str) {
        let Some(device) = self.devices.remove(ifname) else {
            return;
        };
        device.ingress.remove();
        device.egress.remove();
        debug!(device = ifname, "capture detached");
    }

    /// What the data plane could not do on its last pass and keeps retrying (the capture it
    /// has stays as it is meanwhile): `mesh-agent status` and `mesh_agent_capture_problems`.
    pub fn problems(&self) -> Vec<String> {
        let lookup = self
            .lookup_problem
            .0
            .iter()
            .map(|p| format!("device lookup: {p}"));
        let uplinks = self
            .uplink_problem
            .0
            .iter()
            .map(|p| format!("uplinks: {p}"));
        let attach = self
            .uplink_attach_problems
            .iter()
            .filter_map(|(device, p)| p.0.as_ref().map(|p| format!("uplink {device}: {p}")));
        lookup.chain(uplinks).chain(attach).collect()
    }

    /// Records that a captured pod's device could not be looked up (its capture stays); true
    /// when this problem is new, so the caller logs it once.
    pub fn lookup_failed(&mut self, problem: String) -> bool {
        self.lookup_problem.report(problem)
    }

    /// Forgets a device lookup problem; true when there was one.
    pub fn lookups_work(&mut self) -> bool {
        self.lookup_problem.clear()
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
            if let Some((_, link)) = self.uplinks.remove(&name) {
                link.remove();
            }
            info!(device = %name, "uplink capture detached");
        }
        self.uplink_attach_problems
            .retain(|name, _| wanted.contains_key(name));
        for (name, ifindex) in wanted {
            if self.uplinks.contains_key(name) {
                continue;
            }
            match self.attach(PROG_UPLINK, *ifindex, Role::Uplink) {
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
            dataplane: self.dataplane.clone(),
        }
    }
}

/// A link just created, taken from program `name`, as the fd link that gets pinned at `path`.
fn fd_link<L>(
    taken: Result<L, ProgramError>,
    name: &'static str,
    path: &std::path::Path,
) -> Result<FdLink, CaptureError>
where
    L: TryInto<FdLink, Error = aya::programs::links::LinkError>,
{
    taken
        .map_err(|e| program_error(name, e))?
        .try_into()
        .map_err(|e| CaptureError::Pin {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Pins a freshly created link, replacing a stale pin of the same name (a defunct link whose
/// device went away).
fn pin_link(link: FdLink, path: PathBuf) -> Result<Pinned, CaptureError> {
    let _ = std::fs::remove_file(&path);
    let pinned = link.pin(&path).map_err(|e| CaptureError::Pin {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Pinned {
        path,
        link: pinned.into(),
    })
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
