//! The one plot: per-packet cost of each path next to the baselines.
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::packet_cost::PacketCost;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn packet_cost(cost: &PacketCost, path: &Path) -> Result<()> {
    let font =
        std::fs::read(FONT).with_context(|| format!("{FONT} (package fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;

    let bars: Vec<(String, f64, f64, f64)> = cost
        .paths
        .iter()
        .map(|p| {
            (
                p.path.to_string(),
                p.per_call.median,
                p.per_call.min,
                p.per_call.max,
            )
        })
        .chain(cost.scale.iter().map(|s| {
            (
                format!("established, {} flows", s.flows),
                s.per_call.median,
                s.per_call.min,
                s.per_call.max,
            )
        }))
        .collect();
    let top = bars.iter().map(|b| b.3).fold(0.0, f64::max) * 1.1;

    let root = BitMapBackend::new(path, (1100, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "lb per-packet cost, one BPF_PROG_TEST_RUN call each (median, min-max of rounds)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(300)
        .build_cartesian_2d(0.0..top, (0..bars.len()).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc("ns per call (includes the fixed cost of a call, = xdp_pass)")
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.0.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .y_labels(bars.len())
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let colour = if b.0.contains("baseline") {
            RGBColor(150, 150, 150)
        } else {
            RGBColor(40, 100, 180)
        };
        Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (b.1, SegmentValue::Exact(i + 1)),
            ],
            colour.filled(),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        PathElement::new(
            vec![
                (b.2, SegmentValue::CenterOf(i)),
                (b.3, SegmentValue::CenterOf(i)),
            ],
            BLACK.stroke_width(2),
        )
    }))?;
    root.present()?;
    Ok(())
}
