//! What the kernel has attached to a device through TCX, asked directly (`BPF_PROG_QUERY` on
//! the device, in its namespace) rather than through the agent's own report.
//!
//! Debian 12's bpftool (7.1) cannot show this: `bpftool net show dev X` lists no TCX program
//! (TCX support came in bpftool 7.3) and `bpftool link show` prints TCX links as `type 11`,
//! without their device.

use std::ffi::CString;

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::Netns;

/// One program attached to a device: its kernel id and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub id: u32,
    pub name: String,
}

/// The TCX programs of one device, in the kernel's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcxPrograms {
    pub ingress: Vec<Attached>,
    pub egress: Vec<Attached>,
}

impl TcxPrograms {
    /// Every attached program's name, ingress first.
    pub fn names(&self) -> Vec<&str> {
        self.ingress
            .iter()
            .chain(&self.egress)
            .map(|p| p.name.as_str())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.ingress.is_empty() && self.egress.is_empty()
    }
}

impl Netns {
    /// The programs attached to `device` of this namespace with TCX, ingress and egress.
    pub fn tcx_programs(&self, device: &str) -> Result<TcxPrograms> {
        let name = CString::new(device).context("device name")?;
        let dev = device.to_owned();
        self.run(move || -> Result<TcxPrograms> {
            let query = |hook: TcAttachType| -> Result<Vec<Attached>> {
                let (_revision, programs) = SchedClassifier::query_tcx(&name, hook)
                    .with_context(|| format!("BPF_PROG_QUERY on {dev} {hook:?}"))?;
                Ok(programs
                    .iter()
                    .map(|p| Attached {
                        id: p.id(),
                        name: p.name_as_str().unwrap_or_default().to_owned(),
                    })
                    .collect())
            };
            Ok(TcxPrograms {
                ingress: query(TcAttachType::Ingress)?,
                egress: query(TcAttachType::Egress)?,
            })
        })?
        .with_context(|| format!("TCX programs of {device} in {}", self.name()))
    }
}
