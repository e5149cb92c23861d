//! Empty library target: lets mesh-agent's build.rs depend on this crate so cargo tracks it.
#![no_std]
