//! `cargo xtask bench`: lb's data plane against its limit (BPF_PROG_TEST_RUN), end to end
//! against nftables and HAProxy through veth, and the control plane. Writes BENCHMARKS.md,
//! the raw figures as JSON and a plot. Needs root.
mod load;
mod packet_cost;
mod stats;
mod veth;

use anyhow::Result;

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        packet_cost::Plan { rounds: 3, calls: 2_000, scale_flows: vec![1_000, 100_000, 1_000_000] }
    } else {
        packet_cost::Plan { rounds: 7, calls: 20_000, scale_flows: vec![1_000, 100_000, 1_000_000] }
    };
    let t = std::time::Instant::now();
    if std::env::args().any(|a| a == "--veth-only") {
        let v = veth::run(&veth::Plan { rounds: 1, duration: std::time::Duration::from_secs(3), concurrency: 48, clients: 60 })?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let cost = packet_cost::run(&plan)?;
    println!("{}", serde_json::to_string_pretty(&cost)?);
    eprintln!("{:?}", t.elapsed());
    Ok(())
}
