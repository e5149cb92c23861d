//! All maps of the capture programs, and small accessors for them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use mesh_common::{CaptureConfig, DataPlaneMeta, WORKLOAD_ENROLLED, Workload, counter};

/// Enrolled pods of this node, keyed by IPv4 address as it appears in the packet.
#[map]
pub static WORKLOADS: HashMap<u32, Workload> = HashMap::with_max_entries(4096, 0);

/// Ports and marks, written once by the agent before any program is attached.
#[map]
pub static CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);

/// What the pinned data plane is (layout, creation, adoption); for the agent only.
#[map]
pub static META: Array<DataPlaneMeta> = Array::with_max_entries(1, 0);

/// Event counters, see `mesh_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn is_enrolled(addr: u32) -> bool {
    // SAFETY: the value is only read, and copied out at once.
    match unsafe { WORKLOADS.get(&addr) } {
        Some(w) => w.flags & WORKLOAD_ENROLLED != 0,
        None => false,
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
