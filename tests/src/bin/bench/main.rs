//! `cargo xtask bench [--quick]`: lb's data plane against its limit (BPF_PROG_TEST_RUN),
//! end to end against nftables and HAProxy through veth, the control plane, and an HA
//! pair (failover, flow sync). Writes
//! BENCHMARKS.md, the raw figures (bench/results.json) and a plot (bench/packet-cost.png)
//! under the current directory. Needs root.
mod control;
mod ha;
mod load;
mod packet_cost;
mod plot;
mod report;
mod stats;
mod veth;

use std::{path::Path, time::Duration, time::Instant};

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Serialize)]
pub struct Results {
    pub mode: &'static str,
    pub machine: report::Machine,
    pub packet_cost: packet_cost::PacketCost,
    pub veth: veth::Veth,
    pub control: control::Control,
    pub ha: ha::Ha,
    pub total_seconds: f64,
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let started = Instant::now();
    let (ha_connections, ha_churn) = if quick {
        (200, Duration::from_secs(3))
    } else {
        (1000, Duration::from_secs(10))
    };
    let (cost_plan, veth_plan, maglev_rounds, health_rounds) = if quick {
        (
            packet_cost::Plan {
                rounds: 3,
                calls: 2_000,
                scale_flows: vec![1_000, 100_000, 1_000_000],
            },
            veth::Plan {
                rounds: 1,
                duration: Duration::from_secs(3),
                concurrency: 48,
                sustained: Duration::from_secs(10),
            },
            3,
            1,
        )
    } else {
        (
            packet_cost::Plan {
                rounds: 7,
                calls: 20_000,
                scale_flows: vec![1_000, 100_000, 1_000_000],
            },
            veth::Plan {
                rounds: 3,
                duration: Duration::from_secs(8),
                concurrency: 48,
                sustained: Duration::from_secs(60),
            },
            9,
            3,
        )
    };
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--spin") {
        let path = args.get(at + 1).map_or("established", String::as_str);
        return packet_cost::spin(path, 10);
    }
    if std::env::args().any(|a| a == "--packet-cost-only") {
        // A development aid: section 1 alone (without the table sizes unless --scale),
        // printed, nothing written.
        let mut plan = cost_plan;
        if !std::env::args().any(|a| a == "--scale") {
            plan.scale_flows.clear();
        }
        let packet_cost = packet_cost::run(&plan).context("per-packet cost")?;
        println!("{}", report::packet_cost_table(&packet_cost));
        return Ok(());
    }
    if std::env::args().any(|a| a == "--ha-only") {
        // A development aid: section 4 alone, printed, nothing written.
        let ha = ha::run(ha_connections, ha_churn).context("high availability")?;
        println!("{}", report::ha_section(&ha));
        return Ok(());
    }
    if std::env::args().any(|a| a == "--control-only") {
        // A development aid: section 3 alone, printed, nothing written.
        let control = control::run(maglev_rounds, health_rounds)?;
        println!("{}", report::control_section(&control));
        return Ok(());
    }
    eprintln!("1/4 per-packet cost (BPF_PROG_TEST_RUN)");
    let packet_cost = packet_cost::run(&cost_plan).context("per-packet cost")?;
    eprintln!("2/4 end to end through veth");
    let veth = veth::run(&veth_plan).context("veth end to end")?;
    eprintln!("3/4 control plane");
    let control = control::run(maglev_rounds, health_rounds)?;
    eprintln!("4/4 high availability");
    let ha = ha::run(ha_connections, ha_churn).context("high availability")?;
    let results = Results {
        mode: if quick { "quick" } else { "full" },
        machine: report::Machine::describe(),
        packet_cost,
        veth,
        control,
        ha,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    let dir = Path::new("bench");
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    plot::packet_cost(&results.packet_cost, &dir.join("packet-cost.png")).context("plot")?;
    std::fs::write("BENCHMARKS.md", report::markdown(&results))?;
    eprintln!(
        "wrote BENCHMARKS.md, bench/results.json, bench/packet-cost.png in {:.0} s",
        results.total_seconds
    );
    Ok(())
}
