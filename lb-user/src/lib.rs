//! The lb control daemon and CLI as a library, so the test harness can drive the same
//! data plane (`Dataplane`) and speak the same control protocol (`api`).
//!
//! Three parts (see README "Layout"): `cli` (what the `lb` commands print and check),
//! `daemon` (the pool of servers, health checks, housekeeping, metrics, the control
//! socket) and `dataplane` (the XDP object, its maps and what is computed for them), with
//! the control protocol (`api`), the configuration (`config`) and address conversions
//! (`addr`) shared by all three.
pub mod addr;
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
