//! Network sysctls of the node namespace that capture changes while it runs, and restores.
//!
//! `net.ipv4.tcp_early_demux` must be off: the proxy's upstream sockets use the client pod's
//! address, so a reply addressed to a pod can match one of them. With early demux the stack
//! attaches that socket to the packet before routing, then refuses to forward a packet that
//! has a socket (`ip_forward` drops it) — the reply never reaches the pod's veth, where the
//! capture programs would deliver it to the proxy.

use std::path::PathBuf;

pub const EARLY_DEMUX: &str = "net/ipv4/tcp_early_demux";

#[derive(Debug, thiserror::Error)]
#[error("sysctl {key}: {source}")]
pub struct SysctlError {
    key: String,
    #[source]
    source: std::io::Error,
}

fn path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key)
}

pub fn get(key: &str) -> Result<String, SysctlError> {
    std::fs::read_to_string(path(key))
        .map(|v| v.trim().to_string())
        .map_err(|source| SysctlError {
            key: key.into(),
            source,
        })
}

pub fn set(key: &str, value: &str) -> Result<(), SysctlError> {
    std::fs::write(path(key), value).map_err(|source| SysctlError {
        key: key.into(),
        source,
    })
}

/// A sysctl changed by the agent, with the value to put back.
#[derive(Debug)]
pub struct Changed {
    key: &'static str,
    previous: String,
}

/// Sets `key` to `value`; returns what to restore, or `None` when it already had that value.
pub fn change(key: &'static str, value: &str) -> Result<Option<Changed>, SysctlError> {
    let previous = get(key)?;
    if previous == value {
        return Ok(None);
    }
    set(key, value)?;
    Ok(Some(Changed { key, previous }))
}

impl Changed {
    pub fn restore(self) -> Result<(), SysctlError> {
        set(self.key, &self.previous)
    }
}
