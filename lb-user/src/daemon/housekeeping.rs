//! The daemon's periodic work on the data plane: garbage collection and table fill levels,
//! alarms on counters that mean refused connections, and which drains are due.
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;
use lb_common::{is_fresh, AffinityKey, Counter, FlowEntry, FlowKey, NS_PER_SEC};
use tracing::warn;

use super::runtime::Overlay;
use crate::{
    api::{TableFill, TableReport},
    config::DaemonConfig,
    dataplane::{monotonic_ns, Dataplane, Removal, Selection, TableReader},
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

    /// Deletes what `plan` found expired and records how full the tables are. The part of
    /// a collection that needs the daemon's lock: a few batched deletes.
    pub fn apply(
        &mut self,
        dp: &mut Dataplane,
        daemon: &DaemonConfig,
        plan: &CollectionPlan,
    ) -> Result<()> {
        let flows = dp.delete_flows(&plan.flows)?;
        let half_open = dp.delete_half_open(&plan.half_open)?;
        let affinities = dp.delete_affinities(&plan.affinities)?;
        self.record_collection(daemon, flows, half_open, affinities);
        Ok(())
    }

    /// Updates the table report after a collection; a table above `NEARLY_FULL` is logged
    /// (and counted): the LRU tables then evict live entries, the flow table refuses.
    fn record_collection(
        &mut self,
        daemon: &DaemonConfig,
        flows: Removal,
        half_open: Removal,
        affinities: Removal,
    ) {
        let previous = self.tables;
        let fill = |c: Removal, capacity: u32| TableFill {
            entries: c.kept as u64,
            capacity: u64::from(capacity),
        };
        let mut tables = TableReport {
            flows: fill(flows, daemon.max_flows),
            half_open: fill(half_open, daemon.max_half_open),
            affinities: fill(affinities, daemon.max_affinities),
            gc_passes_nearly_full: previous.gc_passes_nearly_full,
            collected_flows: previous.collected_flows
                + flows.removed as u64
                + half_open.removed as u64,
            collected_affinities: previous.collected_affinities + affinities.removed as u64,
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

/// What a garbage collection will delete: expired flow, half-open and affinity entries
/// (the data plane already ignores them; deleting them frees their slots and SNAT ports).
#[derive(Debug, Default)]
pub struct CollectionPlan {
    flows: Selection<FlowKey>,
    half_open: Selection<FlowKey>,
    affinities: Selection<AffinityKey>,
}

impl CollectionPlan {
    /// The flow directions it deletes.
    pub fn expired_flows(&self) -> &[FlowKey] {
        &self.flows.doomed
    }
}

/// Reads every table through `tables` and picks what has expired. The long part of a
/// collection (a million flows take seconds to read), done without the daemon's lock: the
/// data plane never uses an expired entry again, so it stays garbage until
/// `Housekeeping::apply`, unless a new flow takes over its key meanwhile (a client or a
/// SNAT claim reusing the tuple within those seconds), which the delete then ends, as any
/// read-then-delete walk of a live table would. `affinity_timeouts_ns` holds each installed service's affinity
/// timeout; affinities of any other service are garbage too.
pub fn plan_collection(
    tables: &TableReader,
    affinity_timeouts_ns: &BTreeMap<u32, u64>,
) -> Result<CollectionPlan> {
    let now = monotonic_ns();
    let expired = |_: &FlowKey, e: &FlowEntry| {
        !is_fresh(e.last_seen_ns, u64::from(e.timeout_s) * NS_PER_SEC, now)
    };
    Ok(CollectionPlan {
        flows: tables.select_flows(expired)?,
        half_open: tables.select_half_open(expired)?,
        affinities: tables.select_affinities(|k, e| {
            affinity_timeouts_ns
                .get(&k.service_id)
                .is_none_or(|t| !is_fresh(e.last_seen_ns, *t, now))
        })?,
    })
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
    fn collections_add_up_and_a_nearly_full_table_is_counted() {
        let daemon = Config::parse(crate::config::tests::MINIMAL).unwrap().daemon;
        let mut housekeeping = Housekeeping::default();
        let some = |kept, removed| Removal { removed, kept };
        housekeeping.record_collection(&daemon, some(10, 4), some(3, 2), some(5, 1));
        let nearly_full = daemon.max_flows as usize;
        housekeeping.record_collection(&daemon, some(nearly_full, 1), some(0, 0), some(5, 0));
        let tables = housekeeping.tables();
        assert_eq!(tables.collected_flows, 4 + 2 + 1);
        assert_eq!(tables.collected_affinities, 1);
        assert_eq!(tables.flows.entries, nearly_full as u64);
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
