//! The lb control daemon and CLI as a library, so the test harness can drive the same
//! data plane (`Dataplane`) and speak the same control protocol (`api`).
pub mod announce;
pub mod api;
pub mod batch;
pub mod checks;
pub mod closing;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod next_hops;
pub mod pool;
pub mod preset;
pub mod runtime;
pub mod status;
pub mod top;
pub mod vlan;
