//! Resource limits of the agent process: what it raised at start, shown in `mesh-agent status`.
//!
//! Every connection the proxy carries costs descriptors (two for a plain one, a stream's
//! upstream socket for a tunnelled one); the usual soft limit of 1,024 would be reached by a
//! few hundred connections. The soft open-files limit is raised to the hard one at start.

use serde::Serialize;

/// The open-files limit after start.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OpenFiles {
    /// The soft limit in force.
    pub current: u64,
    pub hard: u64,
}

/// Raises the soft open-files limit to the hard limit; returns what is in force (unchanged when
/// it cannot be raised).
pub fn raise_open_files() -> OpenFiles {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct passed; it outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return OpenFiles {
            current: 0,
            hard: 0,
        };
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above; setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    OpenFiles {
        current: limit.rlim_cur,
        hard: limit.rlim_max,
    }
}
