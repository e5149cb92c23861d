//! Checks that the kernel offers what capture needs, and says in one line what is missing.

use std::path::{Path, PathBuf};

/// What the running kernel provides to the capture programs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelFeatures {
    /// Where cgroup v2 is mounted (sock_ops attaches at its root).
    pub cgroup2: PathBuf,
    /// Where bpffs is mounted.
    pub bpffs: PathBuf,
    pub kernel_release: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "kernel BTF is missing (/sys/kernel/btf/vmlinux not found): mesh-agent needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf,
    #[error(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo): mount it, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error("bpffs is not mounted at {path} and mounting it failed: {source}")]
    NoBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub const BPFFS: &str = "/sys/fs/bpf";

/// Verifies BTF, cgroup v2 and bpffs (mounting bpffs when it is absent).
pub fn check() -> Result<KernelFeatures, KernelError> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(KernelError::NoBtf);
    }
    let mountinfo = read("/proc/self/mountinfo")?;
    let cgroup2 = mount_point(&mountinfo, "cgroup2").ok_or(KernelError::NoCgroup2)?;
    let bpffs = PathBuf::from(BPFFS);
    if !mountinfo_has(&mountinfo, BPFFS, "bpf") {
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| KernelError::NoBpffs {
            path: bpffs.clone(),
            source,
        })?;
    }
    let kernel_release = read("/proc/sys/kernel/osrelease")?.trim().to_string();
    Ok(KernelFeatures {
        cgroup2,
        bpffs,
        kernel_release,
    })
}

fn read(path: &str) -> Result<String, KernelError> {
    std::fs::read_to_string(path).map_err(|source| KernelError::Read {
        path: path.into(),
        source,
    })
}

/// Mount point of the first mount of `fstype` (mountinfo: fields, then " - fstype source opts").
fn mount_point(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != fstype {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn mountinfo_has(mountinfo: &str, path: &str, fstype: &str) -> bool {
    mountinfo.lines().any(|line| {
        let Some((left, right)) = line.split_once(" - ") else {
            return false;
        };
        left.split_whitespace().nth(4) == Some(path)
            && right.split_whitespace().next() == Some(fstype)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        assert_eq!(
            mount_point(HYBRID, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_point("1 2 0:1 / / rw - ext4 /dev/vda rw", "cgroup2"),
            None
        );
    }

    #[test]
    fn detects_bpffs() {
        assert!(mountinfo_has(HYBRID, "/sys/fs/bpf", "bpf"));
        assert!(!mountinfo_has(HYBRID, "/sys/fs/bpf/x", "bpf"));
    }
}
