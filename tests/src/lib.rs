//! The veth / network-namespace harness: real clients, the real XDP program, real servers.
//! Every namespace, link and process a test creates is removed when its owner is dropped,
//! also when the test fails.
pub mod active_active;
pub mod churn;
pub mod client;
pub mod cluster;
pub mod daemon;
pub mod fixture;
pub mod heartbeat;
pub mod netns;
pub mod packet;
pub mod pair;
pub mod rng;
pub mod server;
pub mod tls;
pub mod topology;
pub mod wait;
