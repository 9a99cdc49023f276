//! The packaged unit is `Type=notify` with a watchdog: the daemon tells systemd when the
//! data plane is attached and its maps are filled, and feeds the watchdog from its main
//! loop, so a wedged loop gets the daemon restarted (the pinned data plane forwards on
//! meanwhile). Outside systemd (no `NOTIFY_SOCKET`) all of this does nothing.
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "telling systemd");
    }
}

pub fn ready(services: usize) {
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("balancing {services} services")),
    ]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// How often to feed the watchdog: twice per `WatchdogSec`, as systemd advises; None when
/// the unit has no watchdog.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

pub fn feed_watchdog() {
    notify(&[NotifyState::Watchdog]);
}
