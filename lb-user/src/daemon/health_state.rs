//! What the health checks have said about each server: whether it is down (and which check
//! took it out) and the last result, by (service, address).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::health::Report;
use crate::api::{unix_now, CheckOutcome};

type ServerKey = (String, IpAddr);

#[derive(Debug, Default)]
pub struct HealthState {
    /// Servers out of selection, with the failed check that took them out.
    down: BTreeMap<ServerKey, String>,
    last: BTreeMap<ServerKey, CheckOutcome>,
    failures: BTreeMap<ServerKey, u64>,
    /// When each server last moved in or out (Unix seconds).
    changed: BTreeMap<ServerKey, u64>,
}

/// A server moving in or out of selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Up { reason: String },
    Down { reason: String },
}

impl HealthState {
    /// Records one check; returns the transition it made, if any.
    pub fn record(&mut self, report: &Report) -> Option<Transition> {
        let key = (report.service.clone(), report.address);
        let outcome = match &report.result {
            Ok(latency) => CheckOutcome::Passed {
                latency_ms: latency.as_secs_f64() * 1000.0,
            },
            Err(reason) => {
                *self.failures.entry(key.clone()).or_default() += 1;
                CheckOutcome::Failed {
                    reason: reason.clone(),
                }
            }
        };
        let reason = outcome.to_string();
        self.last.insert(key.clone(), outcome);
        let transition = match report.transition? {
            true => self.down.remove(&key).map(|_| Transition::Up { reason }),
            false => self
                .down
                .insert(key.clone(), reason.clone())
                .is_none()
                .then_some(Transition::Down { reason }),
        };
        if transition.is_some() {
            self.changed.insert(key, unix_now());
        }
        transition
    }

    /// Failed checks of the server since the daemon started.
    pub fn failures(&self, service: &str, address: IpAddr) -> u64 {
        self.failures
            .get(&(service.to_string(), address))
            .copied()
            .unwrap_or(0)
    }

    /// When checks last moved the server in or out (Unix seconds).
    pub fn changed_unix(&self, service: &str, address: IpAddr) -> Option<u64> {
        self.changed.get(&(service.to_string(), address)).copied()
    }

    /// The failed check that took the server out, if it is down.
    pub fn down_reason(&self, service: &str, address: IpAddr) -> Option<&str> {
        self.down
            .get(&(service.to_string(), address))
            .map(String::as_str)
    }

    pub fn is_down(&self, service: &str, address: IpAddr) -> bool {
        self.down_reason(service, address).is_some()
    }

    pub fn last_check(&self, service: &str, address: IpAddr) -> Option<&CheckOutcome> {
        self.last.get(&(service.to_string(), address))
    }

    /// Forgets servers no longer checked: one that comes back starts as up.
    pub fn retain(&mut self, checked: &BTreeSet<ServerKey>) {
        self.down.retain(|k, _| checked.contains(k));
        self.last.retain(|k, _| checked.contains(k));
        self.failures.retain(|k, _| checked.contains(k));
        self.changed.retain(|k, _| checked.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn report(result: Result<Duration, String>, transition: Option<bool>) -> Report {
        Report {
            service: "web".into(),
            address: "10.2.0.11".parse().unwrap(),
            result,
            transition,
        }
    }

    #[test]
    fn a_server_goes_down_with_its_reason_and_comes_back_up() {
        let mut state = HealthState::default();
        let address = "10.2.0.11".parse().unwrap();
        assert_eq!(state.record(&report(Err("refused".into()), None)), None);
        assert!(
            !state.is_down("web", address),
            "a failure without a transition"
        );
        let down = state.record(&report(Err("refused".into()), Some(false)));
        assert_eq!(
            down,
            Some(Transition::Down {
                reason: "failed: refused".into()
            })
        );
        assert_eq!(state.down_reason("web", address), Some("failed: refused"));
        // The checker repeating itself changes nothing.
        assert_eq!(
            state.record(&report(Err("refused".into()), Some(false))),
            None
        );
        let up = state.record(&report(Ok(Duration::from_millis(2)), Some(true)));
        assert!(matches!(up, Some(Transition::Up { .. })));
        assert!(!state.is_down("web", address));
        assert_eq!(state.failures("web", address), 3);
        assert!(state.changed_unix("web", address).is_some());
        assert_eq!(
            state.last_check("web", address),
            Some(&CheckOutcome::Passed { latency_ms: 2.0 })
        );
    }

    #[test]
    fn servers_no_longer_checked_are_forgotten() {
        let mut state = HealthState::default();
        let address = "10.2.0.11".parse().unwrap();
        state.record(&report(Err("timeout".into()), Some(false)));
        state.retain(&BTreeSet::new());
        assert!(!state.is_down("web", address));
        assert_eq!(state.last_check("web", address), None);
    }
}
