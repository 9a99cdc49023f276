//! The daemon's periodic work on the data plane: garbage collection and table fill levels,
//! the affinity refresh, alarms on counters that mean refused connections, and which drains
//! are due.
use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{Counter, SweepCount, SweepTally};
use tracing::warn;

use super::runtime::Overlay;
use crate::{
    api::{TableFill, TableReport},
    config::DaemonConfig,
};

/// Fill level at which a table counts as nearly full.
const NEARLY_FULL: f64 = 0.9;

/// Counters that mean new connections are being refused, with what the operator should do.
const ALARM_COUNTERS: [(Counter, &str); 3] = [
    (Counter::DropSnatExhausted, "SNAT ports exhausted: new flows refused, existing ones unaffected; add daemon.snat_addresses or widen snat_port_min..snat_port_max"),
    (Counter::FlowTableFull, "flow table full: confirmed flows stay half-open and end at the handshake timeout; raise daemon.max_flows"),
    (Counter::DropFlowInsert, "half-open table refused an insert: new flows refused; raise daemon.max_half_open"),
];

#[derive(Debug, Default)]
pub struct Housekeeping {
    /// Table fill levels seen by the last garbage collection.
    tables: TableReport,
    /// Last seen value of each counter in `ALARM_COUNTERS`.
    alarms_seen: BTreeMap<&'static str, u64>,
    /// When a collection last refreshed the affinities of live connections (monotonic ns).
    affinities_refreshed_ns: Option<u64>,
}

/// An alarm counter that grew since the last reading.
#[derive(Debug, PartialEq, Eq)]
pub struct Alarm {
    pub counter: &'static str,
    pub new: u64,
    pub total: u64,
    pub advice: &'static str,
}

impl Housekeeping {
    pub fn tables(&self) -> TableReport {
        self.tables
    }

    /// Whether the collection starting now refreshes the affinities of live connections
    /// (it costs a lookup per connection, a third of the sweep's time): only as often as
    /// keeps every such affinity within half of the shortest affinity timeout, counting the
    /// wait until the next collection.
    pub fn affinity_refresh_due(
        &mut self,
        now_ns: u64,
        gc_interval_ns: u64,
        shortest_timeout_ns: u64,
    ) -> bool {
        let due = self.affinities_refreshed_ns.is_none_or(|last| {
            now_ns.saturating_sub(last) + gc_interval_ns >= shortest_timeout_ns / 2
        });
        if due {
            self.affinities_refreshed_ns = Some(now_ns);
        }
        due
    }

    /// The alarm counters that grew since the last call (called every second), each also
    /// logged as a warning: the operator sees refused connections in the log, not only in
    /// `lb status`.
    pub fn watch_counters(&mut self, counters: &[(Counter, u64)]) -> Vec<Alarm> {
        let mut alarms = Vec::new();
        for (counter, advice) in ALARM_COUNTERS {
            let now = counters
                .iter()
                .find(|(c, _)| *c == counter)
                .map_or(0, |(_, v)| *v);
            let before = self.alarms_seen.insert(counter.name(), now);
            // The first reading (and a data plane restarted from zero) only sets the baseline.
            if let Some(before) = before.filter(|b| now > *b) {
                warn!(
                    counter = counter.name(),
                    new = now - before,
                    total = now,
                    "{advice}"
                );
                alarms.push(Alarm {
                    counter: counter.name(),
                    new: now - before,
                    total: now,
                    advice,
                });
            }
        }
        alarms
    }

    /// Records a garbage collection (`Sweeper::sweep`): how full the tables are now and
    /// what went; a table above `NEARLY_FULL` is logged (and counted): the LRU tables then
    /// evict live entries, the flow table refuses.
    pub fn record_collection(&mut self, daemon: &DaemonConfig, sweep: &SweepTally) {
        let previous = self.tables;
        let fill = |c: SweepCount, capacity: u32| TableFill {
            entries: c.kept,
            capacity: u64::from(capacity),
        };
        let mut tables = TableReport {
            flows: fill(sweep.flows, daemon.max_flows),
            half_open: fill(sweep.half_open, daemon.max_half_open),
            affinities: fill(sweep.affinities, daemon.max_affinities),
            gc_passes_nearly_full: previous.gc_passes_nearly_full,
            collected_flows: previous.collected_flows
                + sweep.flows.removed
                + sweep.half_open.removed,
            collected_affinities: previous.collected_affinities + sweep.affinities.removed,
        };
        // The half-open table is left out: under a SYN flood it is full by design.
        for (name, fill) in [("flows", tables.flows), ("affinities", tables.affinities)] {
            if fill.entries as f64 >= fill.capacity as f64 * NEARLY_FULL {
                tables.gc_passes_nearly_full += 1;
                warn!(
                    table = name,
                    entries = fill.entries,
                    capacity = fill.capacity,
                    "table nearly full; raise max_{name}"
                );
            }
        }
        self.tables = tables;
    }
}

/// Drains whose deadline has passed and that are not cut yet, as (service, server).
pub fn due_drains(overlay: &Overlay, now_unix: u64) -> Vec<(String, IpAddr)> {
    let mut due = Vec::new();
    for (service, o) in &overlay.services {
        for (address, drain) in &o.draining {
            if !drain.cut && drain.deadline_unix.is_some_and(|d| d <= now_unix) {
                due.push((service.clone(), *address));
            }
        }
    }
    due
}

#[cfg(test)]
mod tests {
    use lb_common::NS_PER_SEC;

    use super::*;
    use crate::{config::Config, daemon::runtime::Drain};

    #[test]
    fn an_alarm_counter_raises_only_when_it_grows_after_the_first_reading() {
        let mut housekeeping = Housekeeping::default();
        let snat = |n| vec![(Counter::DropSnatExhausted, n)];
        assert!(housekeeping.watch_counters(&snat(5)).is_empty(), "baseline");
        assert!(
            housekeeping.watch_counters(&snat(5)).is_empty(),
            "no growth"
        );
        let alarms = housekeeping.watch_counters(&snat(8));
        assert_eq!(alarms.len(), 1);
        assert_eq!(
            (alarms[0].counter, alarms[0].new, alarms[0].total),
            ("drop_snat_exhausted", 3, 8)
        );
        // A data plane restarted from zero only resets the baseline.
        assert!(housekeeping.watch_counters(&snat(0)).is_empty());
        assert_eq!(housekeeping.watch_counters(&snat(1)).len(), 1);
    }

    #[test]
    fn affinities_are_refreshed_first_and_then_within_half_the_timeout() {
        let mut housekeeping = Housekeeping::default();
        let s = NS_PER_SEC;
        // 1800 s affinities, a collection every 10 s: a refresh every 890 s or so.
        let due: Vec<u64> = (0..200)
            .map(|n| n * 10)
            .filter(|&t| housekeeping.affinity_refresh_due(t * s, 10 * s, 1800 * s))
            .collect();
        assert_eq!(due, [0, 890, 1780]);
        // Affinities shorter than the collection interval: every collection refreshes.
        let mut housekeeping = Housekeeping::default();
        assert!((0..5).all(|n| housekeeping.affinity_refresh_due(n * 10 * s, 10 * s, 3 * s)));
    }

    #[test]
    fn collections_add_up_and_a_nearly_full_table_is_counted() {
        let daemon = Config::parse(crate::config::tests::MINIMAL).unwrap().daemon;
        let mut housekeeping = Housekeeping::default();
        let some = |kept, removed| SweepCount { kept, removed };
        let tally = |flows, half_open, affinities| SweepTally {
            flows,
            half_open,
            affinities,
            unannounced: 0,
        };
        housekeeping.record_collection(&daemon, &tally(some(10, 4), some(3, 2), some(5, 1)));
        let nearly_full = u64::from(daemon.max_flows);
        housekeeping.record_collection(
            &daemon,
            &tally(some(nearly_full, 1), some(0, 0), some(5, 0)),
        );
        let tables = housekeeping.tables();
        assert_eq!(tables.collected_flows, 4 + 2 + 1);
        assert_eq!(tables.collected_affinities, 1);
        assert_eq!(tables.flows.entries, nearly_full);
        assert_eq!(tables.gc_passes_nearly_full, 1);
    }

    #[test]
    fn a_drain_is_due_once_its_deadline_passed_and_only_until_it_is_cut() {
        let mut overlay = Overlay::default();
        let server: IpAddr = "10.2.0.11".parse().unwrap();
        let drain = |deadline_unix, cut| Drain { deadline_unix, cut };
        let draining = &mut overlay.service_mut("web").draining;
        draining.insert(server, drain(Some(100), false));
        draining.insert("10.2.0.12".parse().unwrap(), drain(None, false));
        assert!(due_drains(&overlay, 99).is_empty());
        assert_eq!(due_drains(&overlay, 100), [("web".to_string(), server)]);
        overlay
            .service_mut("web")
            .draining
            .insert(server, drain(Some(100), true));
        assert!(due_drains(&overlay, 200).is_empty());
    }
}
