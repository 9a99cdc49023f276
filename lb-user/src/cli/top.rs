//! `lb top`: a live view of services and servers (health, drain state, flows, new flows/s,
//! bytes/s, affinities, hottest clients), refreshed every second in the terminal, so it
//! works over ssh. `q`, Esc or Ctrl-C quits; a daemon that stops answering is shown, and
//! the view recovers when it answers again.
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row, Table},
    Frame,
};

use crate::api::{self, unix_now, Request, Response, ServerState, StatusReport, Traffic};

/// A status report and when it was taken.
struct Sample {
    report: StatusReport,
    at: Instant,
}

/// What one frame shows: the latest report, rates against the one before, or the error
/// that kept the latest from arriving.
#[derive(Default)]
pub struct View {
    latest: Option<Sample>,
    rates: BTreeMap<String, Rates>,
    error: Option<String>,
}

/// Per second, over the last refresh.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Rates {
    new_flows: f64,
    bytes_in: f64,
    bytes_out: f64,
}

impl Rates {
    fn between(before: &Traffic, after: &Traffic, seconds: f64) -> Self {
        let per_second = |b: u64, a: u64| a.saturating_sub(b) as f64 / seconds;
        Self {
            new_flows: per_second(before.new_flows, after.new_flows),
            bytes_in: per_second(before.bytes_in, after.bytes_in),
            bytes_out: per_second(before.bytes_out, after.bytes_out),
        }
    }
}

/// Rate keys: a service's name, or "service/server".
fn traffic_by_key(report: &StatusReport) -> BTreeMap<String, Traffic> {
    let mut all = BTreeMap::new();
    for s in &report.services {
        all.insert(s.name.clone(), s.stats);
        for b in &s.backends {
            all.insert(format!("{}/{}", s.name, b.endpoint()), b.stats);
        }
    }
    all
}

impl View {
    pub fn update(&mut self, report: Result<StatusReport>, at: Instant) {
        let report = match report {
            Ok(report) => report,
            Err(e) => {
                self.error = Some(format!("{e:#}"));
                return;
            }
        };
        self.error = None;
        self.rates.clear();
        if let Some(previous) = &self.latest {
            let seconds = at.duration_since(previous.at).as_secs_f64();
            if seconds > 0.0 {
                let before = traffic_by_key(&previous.report);
                for (key, after) in traffic_by_key(&report) {
                    if let Some(before) = before.get(&key) {
                        self.rates
                            .insert(key, Rates::between(before, &after, seconds));
                    }
                }
            }
        }
        self.latest = Some(Sample { report, at });
    }

    pub fn draw(&self, frame: &mut Frame) {
        let [top, body, bottom] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Min(3),
            Constraint::Length(8),
        ])
        .areas(frame.area());
        frame.render_widget(self.summary(), top);
        frame.render_widget(self.pool_table(), body);
        frame.render_widget(self.hot_sources(), bottom);
    }

    fn summary(&self) -> Paragraph<'static> {
        let mut lines = vec![Line::styled(
            "lb top: q to quit",
            Style::default().add_modifier(Modifier::BOLD),
        )];
        if let Some(e) = &self.error {
            lines.push(Line::styled(
                format!("daemon not answering: {e}"),
                Style::default().fg(Color::Red),
            ));
        } else if let Some(sample) = &self.latest {
            let c = &sample.report.counters;
            let drops: u64 = c
                .iter()
                .filter(|(k, _)| k.starts_with("drop_"))
                .map(|(_, v)| v)
                .sum();
            lines.push(Line::from(format!(
                "packets {}  new flows {}  drops {drops}  flows {}/{}  affinities {}/{}",
                c.get("packets").copied().unwrap_or(0),
                c.get("new_flows").copied().unwrap_or(0),
                sample.report.tables.flows.entries,
                sample.report.tables.flows.capacity,
                sample.report.tables.affinities.entries,
                sample.report.tables.affinities.capacity,
            )));
        }
        Paragraph::new(lines)
    }

    fn pool_table(&self) -> Table<'static> {
        let header = Row::new([
            "service / server",
            "state",
            "health",
            "flows",
            "new/s",
            "in B/s",
            "out B/s",
            "affinities",
        ])
        .style(Style::default().add_modifier(Modifier::BOLD));
        let mut rows = Vec::new();
        let now = unix_now();
        for s in self.latest.iter().flat_map(|l| &l.report.services) {
            let rate = self.rates.get(&s.name).copied().unwrap_or_default();
            let flows: u64 = s.backends.iter().map(|b| b.active_flows).sum();
            let affinities: u64 = s.backends.iter().map(|b| b.affinities).sum();
            rows.push(
                Row::new([
                    format!("{} {}:{} {}", s.name, s.vip, s.port, s.protocol),
                    String::new(),
                    String::new(),
                    flows.to_string(),
                    format!("{:.0}", rate.new_flows),
                    format!("{:.0}", rate.bytes_in),
                    format!("{:.0}", rate.bytes_out),
                    affinities.to_string(),
                ])
                .style(Style::default().add_modifier(Modifier::BOLD)),
            );
            for b in &s.backends {
                let rate = self
                    .rates
                    .get(&format!("{}/{}", s.name, b.endpoint()))
                    .copied()
                    .unwrap_or_default();
                let colour = match b.state {
                    ServerState::Up => Color::Green,
                    ServerState::Down { .. } => Color::Red,
                    _ => Color::Yellow,
                };
                rows.push(
                    Row::new([
                        format!("  {}", b.endpoint()),
                        b.state.describe(now),
                        b.last_check
                            .as_ref()
                            .map_or_else(|| "-".into(), ToString::to_string),
                        b.active_flows.to_string(),
                        format!("{:.0}", rate.new_flows),
                        format!("{:.0}", rate.bytes_in),
                        format!("{:.0}", rate.bytes_out),
                        b.affinities.to_string(),
                    ])
                    .style(Style::default().fg(colour)),
                );
            }
        }
        Table::new(
            rows,
            [
                Constraint::Min(28),
                Constraint::Length(22),
                Constraint::Length(12),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(10),
            ],
        )
        .header(header)
        .block(Block::bordered().title("services and servers"))
    }

    fn hot_sources(&self) -> Paragraph<'static> {
        let mut lines = Vec::new();
        for s in self.latest.iter().flat_map(|l| &l.report.services) {
            let top: Vec<String> = s
                .top_sources
                .iter()
                .map(|t| {
                    format!(
                        "{} {:.0}%{}",
                        t.client,
                        t.share * 100.0,
                        if t.hot { " HOT" } else { "" }
                    )
                })
                .collect();
            if !top.is_empty() {
                lines.push(Line::from(format!("{}: {}", s.name, top.join("  "))));
            }
        }
        if lines.is_empty() {
            lines.push(Line::from("no client affinities yet"));
        }
        Paragraph::new(lines).block(Block::bordered().title("hottest clients"))
    }
}

/// Runs the view until the user quits. Each refresh is one status call (bounded by the
/// control protocol's own timeout).
pub fn run(socket: &Path, refresh: Duration) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetch = || -> Result<StatusReport> {
        match runtime.block_on(api::call(socket, &Request::Status))? {
            Response::Status(report) => Ok(report),
            other => anyhow::bail!("unexpected response {other:?}"),
        }
    };
    // Raw mode and the alternate screen; restored on return and on panic.
    let mut terminal = ratatui::init();
    let mut view = View::default();
    let result = (|| -> Result<()> {
        loop {
            view.update(fetch(), Instant::now());
            terminal.draw(|frame| view.draw(frame))?;
            let next = Instant::now() + refresh;
            while let Some(left) = next.checked_duration_since(Instant::now()) {
                if !event::poll(left)? {
                    break;
                }
                if let Event::Key(key) = event::read()? {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    let quit = matches!(key.code, KeyCode::Char('q') | KeyCode::Esc);
                    if key.kind == KeyEventKind::Press && (quit || ctrl_c) {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::api::tests::sample_report;

    /// The sample report with these service and server totals, its server draining.
    fn report(new_flows: u64, bytes_in: u64) -> StatusReport {
        let stats = Traffic {
            new_flows,
            bytes_in,
            ..Traffic::default()
        };
        let mut report = sample_report();
        let service = &mut report.services[0];
        service.stats = stats;
        service.backends[0].stats = stats;
        service.backends[0].state = ServerState::Draining {
            deadline_unix: Some(unix_now() + 20),
        };
        report
    }

    fn screen(view: &View) -> String {
        let mut terminal = Terminal::new(TestBackend::new(120, 24)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let buffer = terminal.backend().buffer();
        buffer
            .content()
            .chunks(buffer.area.width as usize)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect()
    }

    #[test]
    fn rates_come_from_two_reports() {
        let start = Instant::now();
        let mut view = View::default();
        view.update(Ok(report(100, 1_000)), start);
        view.update(Ok(report(150, 3_000)), start + Duration::from_secs(2));
        let rate = view.rates["web"];
        assert_eq!((rate.new_flows, rate.bytes_in), (25.0, 1_000.0));
        let text = screen(&view);
        for expected in [
            "web 10.100.0.1:443 tcp",
            "10.2.0.11:4443",
            "draining (20 s left)",
            "192.0.2.7 75% HOT",
            "1000",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
    }

    #[test]
    fn an_unreachable_daemon_is_shown_and_the_view_recovers() {
        let mut view = View::default();
        view.update(Err(anyhow::anyhow!("connection refused")), Instant::now());
        assert!(screen(&view).contains("daemon not answering: connection refused"));
        view.update(Ok(report(1, 1)), Instant::now());
        assert!(!screen(&view).contains("not answering"));
    }
}
