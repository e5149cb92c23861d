//! Where a node's data plane is pinned in bpffs, how its links are named there, and its `META`
//! record.
//!
//! Layout, one directory per network namespace (its cookie: unique for the life of the boot, so a
//! directory left by a deleted namespace is never mistaken for a live one):
//! ```text
//! /sys/fs/bpf/mesh-agent/netns-<cookie>/
//!     META                      what the data plane is, who made it, what uninstall restores
//!     v<layout>/CONFIG, WORKLOADS, COUNTERS
//!     links/tcx-<ifindex>-<ingress|egress|uplink>, links/sockops-<link id>
//! ```
//! Links do not depend on the maps' layout: a newer agent moves them onto its programs with
//! one atomic `BPF_LINK_UPDATE` each.

use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::programs::links::FdLink;
use mesh_common::{DATAPLANE_LAYOUT, DataPlaneMeta};
use serde::Serialize;

/// Directory under the bpffs mount holding every node's pins.
pub const PIN_ROOT: &str = "mesh-agent";

/// `SO_NETNS_COOKIE` (Linux ≥ 5.14; the generic value, as on x86-64 and arm64).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14 or later): {0}")]
    Cookie(#[source] io::Error),
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The pin directory of the data plane of the calling thread's network namespace.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn for_this_netns(bpffs: &Path) -> Result<Self, PinError> {
        let cookie = netns_cookie().map_err(PinError::Cookie)?;
        Ok(Self {
            root: bpffs.join(PIN_ROOT).join(format!("netns-{cookie}")),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Maps of this agent's layout.
    pub fn maps(&self) -> PathBuf {
        self.root.join(format!("v{DATAPLANE_LAYOUT}"))
    }

    pub fn meta(&self) -> PathBuf {
        self.root.join("META")
    }

    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, pin: LinkPin) -> PathBuf {
        self.links().join(pin.file_name())
    }

    /// Map directories of other layouts (left by an older or newer agent).
    pub fn other_layouts(&self) -> Vec<PathBuf> {
        let ours = format!("v{DATAPLANE_LAYOUT}");
        entries(&self.root)
            .into_iter()
            .filter(|(name, _)| {
                name.strip_prefix('v')
                    .is_some_and(|n| n.parse::<u32>().is_ok())
                    && *name != ours
            })
            .map(|(_, path)| path)
            .collect()
    }

    /// Pinned links, parsed from their names; unknown names are left out.
    pub fn pinned_links(&self) -> Vec<(LinkPin, PathBuf)> {
        entries(&self.links())
            .into_iter()
            .filter_map(|(name, path)| LinkPin::parse(&name).map(|pin| (pin, path)))
            .collect()
    }

    pub fn create(&self) -> Result<(), PinError> {
        for path in [self.maps(), self.links()] {
            std::fs::create_dir_all(&path).map_err(|source| PinError::Create {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

fn entries(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    read.flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect()
}

/// What a TCX link does on its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// `capture_ingress` on a pod's veth.
    Ingress,
    /// `capture_egress` on a pod's veth.
    Egress,
    /// `capture_uplink` on a node uplink.
    Uplink,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Ingress => "ingress",
            Role::Egress => "egress",
            Role::Uplink => "uplink",
        }
    }
}

/// The name of a pinned link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LinkPin {
    Tcx { ifindex: u32, role: Role },
    SockOps { id: u32 },
}

impl LinkPin {
    pub fn file_name(self) -> String {
        match self {
            LinkPin::Tcx { ifindex, role } => format!("tcx-{ifindex}-{}", role.name()),
            LinkPin::SockOps { id } => format!("sockops-{id}"),
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        if let Some(id) = name.strip_prefix("sockops-") {
            return Some(LinkPin::SockOps {
                id: id.parse().ok()?,
            });
        }
        let (ifindex, role) = name.strip_prefix("tcx-")?.split_once('-')?;
        let role = [Role::Ingress, Role::Egress, Role::Uplink]
            .into_iter()
            .find(|r| r.name() == role)?;
        Some(LinkPin::Tcx {
            ifindex: ifindex.parse().ok()?,
            role,
        })
    }
}

/// A link pinned in bpffs, held open by this process. Dropping it closes our descriptor only:
/// the pin keeps the link attached. [`Pinned::remove`] detaches it.
#[derive(Debug)]
pub struct Pinned {
    pub path: PathBuf,
    pub link: FdLink,
}

impl Pinned {
    /// Removes the pin; the link goes once no process holds it (a draining predecessor may,
    /// until it exits).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What `mesh-agent status` says of the pinned data plane.
#[derive(Debug, Clone, Serialize)]
pub struct DataPlaneStatus {
    pub pin_dir: String,
    pub layout: u32,
    /// Seconds since the Unix epoch.
    pub pinned_since: u64,
    pub created_by: String,
    /// True when this process found the data plane pinned and took it over.
    pub adopted: bool,
    pub adopted_at: u64,
    pub adopted_by: String,
}

impl DataPlaneStatus {
    pub fn new(pins: &PinDir, meta: &DataPlaneMeta, adopted: bool) -> Self {
        Self {
            pin_dir: pins.root().display().to_string(),
            layout: meta.layout,
            pinned_since: meta.pinned_since,
            created_by: version_text(&meta.created_by),
            adopted,
            adopted_at: meta.adopted_at,
            adopted_by: version_text(&meta.adopted_by),
        }
    }
}

/// The hand-over token in the pinned `META` of this node, as text; empty when there is none
/// (no data plane pinned yet, so no agent to take over from).
pub fn handover_token(pins: &PinDir) -> String {
    use aya::maps::{Array, Map, MapData};
    let meta = MapData::from_pin(pins.meta())
        .ok()
        .and_then(|data| Array::<MapData, DataPlaneMeta>::try_from(Map::Array(data)).ok())
        .and_then(|map| map.get(&0, 0).ok());
    meta.map(|m| token_text(&m.handover_token))
        .unwrap_or_default()
}

/// A token as the hex text the hand-over exchanges.
pub fn token_text(token: &[u8; 16]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cookie of the calling thread's network namespace.
pub fn netns_cookie() -> io::Result<u64> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket fd; the buffer is a u64 with its length passed alongside.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A version string as the NUL-padded bytes `META` stores (cut at 24 bytes).
pub fn version_bytes(version: &str) -> [u8; 24] {
    let mut out = [0u8; 24];
    for (slot, byte) in out.iter_mut().zip(version.bytes()) {
        *slot = byte;
    }
    out
}

pub fn version_text(bytes: &[u8; 24]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_round_trip() {
        for pin in [
            LinkPin::Tcx {
                ifindex: 7,
                role: Role::Ingress,
            },
            LinkPin::Tcx {
                ifindex: 12,
                role: Role::Egress,
            },
            LinkPin::Tcx {
                ifindex: 2,
                role: Role::Uplink,
            },
            LinkPin::SockOps { id: 4711 },
        ] {
            assert_eq!(LinkPin::parse(&pin.file_name()), Some(pin));
        }
        for junk in [
            "tcx-7",
            "tcx-x-ingress",
            "tcx-7-sideways",
            "sockops-",
            "other",
        ] {
            assert_eq!(LinkPin::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn versions_fit_the_record() {
        assert_eq!(version_text(&version_bytes("0.1.0")), "0.1.0");
        let long = "0.1.0-a-very-long-prerelease-tag";
        assert_eq!(version_text(&version_bytes(long)), &long[..24]);
    }

    #[test]
    fn other_layouts_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pins = PinDir {
            root: dir.path().to_path_buf(),
        };
        for name in ["v0", &format!("v{DATAPLANE_LAYOUT}"), "v99", "links", "vx"] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        let mut others = pins.other_layouts();
        others.sort();
        assert_eq!(others, vec![dir.path().join("v0"), dir.path().join("v99")]);
    }

    #[test]
    fn each_namespace_has_its_own_cookie() {
        let here = netns_cookie().expect("cookie");
        assert_eq!(netns_cookie().expect("cookie"), here, "stable");
        assert_ne!(here, 0);
    }
}
