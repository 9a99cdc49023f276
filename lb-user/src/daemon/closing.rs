//! Closed connections leave the flow table within `closing_timeout`: the data plane tells
//! the daemon of every direction that starts closing (a `CloseEvent` in `LB_EVENTS`), and
//! the daemon removes the flow once the timeout has passed, instead of at its next walk of
//! the whole table. At high connection rates that walk came too late: the table filled with
//! flows that were over.
use std::collections::VecDeque;

use aya::maps::{MapData, RingBuf};
use lb_common::{CloseEvent, FlowKey, NS_PER_SEC};

use crate::dataplane::ring_record;

/// Close events held at most: beyond that, flows wait for the next garbage collection.
pub const MAX_QUEUED: usize = 1 << 20;
/// Margin past the closing timeout, for the coarse clock the data plane stamps with.
const MARGIN_NS: u64 = NS_PER_SEC;

/// Flows that started closing, in the order they did, each with the time it may go.
#[derive(Default)]
pub struct CloseQueue {
    due: VecDeque<(u64, FlowKey)>,
    /// Events that found the queue full.
    pub dropped: u64,
}

impl CloseQueue {
    pub fn push(&mut self, event: &CloseEvent, closing_timeout_s: u32) {
        if self.due.len() >= MAX_QUEUED {
            self.dropped += 1;
            return;
        }
        let deadline = event.at_ns + u64::from(closing_timeout_s) * NS_PER_SEC + MARGIN_NS;
        self.due.push_back((deadline, event.key));
    }

    /// The flows whose closing timeout has passed by `now_ns`, oldest first.
    pub fn take_due(&mut self, now_ns: u64) -> Vec<FlowKey> {
        let mut keys = Vec::new();
        while let Some(&(deadline, key)) = self.due.front() {
            if deadline > now_ns {
                break;
            }
            self.due.pop_front();
            keys.push(key);
        }
        keys
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}

/// Moves every event waiting in `LB_EVENTS` into `queue`. The data plane does not wake the
/// daemon per event (a busy balancer closes thousands of connections a second): the daemon
/// drains the ring on its closing tick.
pub fn drain(ring: &mut RingBuf<MapData>, queue: &mut CloseQueue, closing_timeout_s: u32) {
    while let Some(item) = ring.next() {
        if let Some(event) = ring_record::<CloseEvent>(&item) {
            queue.push(&event, closing_timeout_s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at_s: u64, port: u16) -> CloseEvent {
        CloseEvent {
            key: FlowKey {
                src_port_be: port,
                ..FlowKey::default()
            },
            at_ns: at_s * NS_PER_SEC,
        }
    }

    #[test]
    fn flows_come_due_after_the_closing_timeout_in_order() {
        let mut queue = CloseQueue::default();
        queue.push(&event(100, 1), 10);
        queue.push(&event(103, 2), 10);
        assert!(queue.take_due(110 * NS_PER_SEC).is_empty());
        let due = queue.take_due(111 * NS_PER_SEC);
        assert_eq!(due.iter().map(|k| k.src_port_be).collect::<Vec<_>>(), [1]);
        assert_eq!(queue.take_due(200 * NS_PER_SEC).len(), 1);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_full_queue_counts_what_it_drops() {
        let mut queue = CloseQueue::default();
        for i in 0..MAX_QUEUED + 3 {
            queue.push(&event(1, i as u16), 1);
        }
        assert_eq!(queue.len(), MAX_QUEUED);
        assert_eq!(queue.dropped, 3);
    }

    #[test]
    fn short_records_are_ignored() {
        assert!(ring_record::<CloseEvent>(&[0u8; 8]).is_none());
        let whole = [0u8; size_of::<CloseEvent>()];
        assert_eq!(ring_record(&whole), Some(CloseEvent::default()));
    }
}
