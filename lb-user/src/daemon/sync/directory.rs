//! Between this node's table entries and sync records: the names behind its service and
//! server ids, and the positions of its interfaces. Nodes of a group share the config
//! (service names, servers, the order of `daemon.interfaces`), not their ids.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    AffinityEntry, AffinityKey, FlowEntry, FlowKey, FLOW_F_AFFINITY_PORT, FLOW_F_CLOSING,
    FLOW_F_REVERSE, FLOW_F_SEQ_KNOWN, FLOW_F_SYNACK_SEEN, FLOW_F_TOUCH_AFFINITY, NS_PER_SEC,
};

use super::wire::{self, Direction, NO_INTERFACE};
use crate::{
    addr::{addr_from_words, addr_words, family},
    daemon::installation::{BackendIdentity, Installation},
};

/// The flow flags a record carries; the rest are the receiver's own (`FLOW_F_REVERSE`).
const WIRE_FLAGS: u32 = FLOW_F_CLOSING
    | FLOW_F_SEQ_KNOWN
    | FLOW_F_SYNACK_SEEN
    | FLOW_F_TOUCH_AFFINITY
    | FLOW_F_AFFINITY_PORT;

/// Why a record was not installed (counted, per reason, as refused records).
pub type Refusal = &'static str;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directory {
    service_ids: BTreeMap<String, u32>,
    service_names: BTreeMap<u32, String>,
    backend_ids: BTreeMap<BackendIdentity, u32>,
    backends: BTreeMap<u32, BackendIdentity>,
    /// Ifindex of each `daemon.interfaces` entry, in config order.
    interfaces: Vec<u32>,
}

fn socket(words: [u32; 4], port_be: u16, family: u8) -> SocketAddr {
    SocketAddr::new(addr_from_words(words, family), u16::from_be(port_be))
}

fn ms_since(last_seen_ns: u64, now_ns: u64) -> u32 {
    (now_ns.saturating_sub(last_seen_ns) / (NS_PER_SEC / 1000)).min(u64::from(u32::MAX)) as u32
}

fn seen_at(idle_ms: u32, now_ns: u64) -> u64 {
    now_ns.saturating_sub(u64::from(idle_ms) * (NS_PER_SEC / 1000))
}

impl Directory {
    pub fn of(installation: &Installation, interfaces: Vec<u32>) -> Self {
        let service_ids = installation.service_ids().clone();
        let backends: BTreeMap<u32, BackendIdentity> = installation
            .backends_by_id()
            .into_iter()
            .map(|(id, identity)| (id, identity.clone()))
            .collect();
        Self {
            service_names: service_ids.iter().map(|(n, id)| (*id, n.clone())).collect(),
            service_ids,
            backend_ids: backends.iter().map(|(id, b)| (b.clone(), *id)).collect(),
            backends,
            interfaces,
        }
    }

    fn position(&self, ifindex: u32) -> u8 {
        self.interfaces
            .iter()
            .position(|i| *i == ifindex && ifindex != 0)
            .map_or(NO_INTERFACE, |p| p as u8)
    }

    fn ifindex(&self, position: u8) -> u32 {
        self.interfaces
            .get(usize::from(position))
            .copied()
            .unwrap_or(0)
    }

    fn direction(&self, entry: &FlowEntry, now_ns: u64) -> Direction {
        Direction {
            flags: entry.flags & WIRE_FLAGS,
            timeout_s: entry.timeout_s,
            seq_next: entry.seq_next,
            handshake_ack: entry.handshake_ack,
            idle_ms: ms_since(entry.last_seen_ns, now_ns),
            interface: self.position(entry.ingress_ifindex),
        }
    }

    /// The record of a confirmed flow, from its client direction (`key`, `forward`) and
    /// return direction; None for a service or server this node no longer knows.
    pub fn flow_record(
        &self,
        key: &FlowKey,
        forward: &FlowEntry,
        reverse: &FlowEntry,
        now_ns: u64,
    ) -> Option<wire::Flow> {
        let service = self.service_names.get(&forward.service_id)?;
        let backend = self.backends.get(&forward.backend_id)?;
        let server_family = family(backend.address);
        Some(wire::Flow {
            service: service.clone(),
            protocol: key.proto,
            client: socket(key.src_be, key.src_port_be, key.family),
            vip: socket(key.dst_be, key.dst_port_be, key.family),
            snat: socket(forward.new_src_be, forward.new_src_port_be, server_family),
            server: socket(forward.new_dst_be, forward.new_dst_port_be, server_family),
            server_port: backend.port,
            idle_timeout_s: forward.idle_timeout_s,
            forward: self.direction(forward, now_ns),
            reverse: self.direction(reverse, now_ns),
        })
    }

    fn entry(&self, state: &Direction, flow: &wire::Flow, now_ns: u64) -> FlowEntry {
        FlowEntry {
            flags: state.flags & WIRE_FLAGS,
            timeout_s: state.timeout_s,
            idle_timeout_s: flow.idle_timeout_s,
            last_seen_ns: seen_at(state.idle_ms, now_ns),
            ingress_ifindex: self.ifindex(state.interface),
            seq_next: state.seq_next,
            handshake_ack: state.handshake_ack,
            // Generation 0 never matches: the first packet here takes a route lookup.
            ..FlowEntry::default()
        }
    }

    fn service_and_backend(
        &self,
        service: &str,
        server: IpAddr,
        port: u16,
    ) -> Result<(u32, u32), Refusal> {
        let service_id = *self.service_ids.get(service).ok_or("unknown service")?;
        let identity = BackendIdentity {
            service: service.into(),
            address: server,
            port,
        };
        let backend_id = *self.backend_ids.get(&identity).ok_or("unknown server")?;
        Ok((service_id, backend_id))
    }

    /// Both directions' keys and entries of a peer's flow, as this node's tables hold
    /// them.
    pub fn flow_entries(
        &self,
        flow: &wire::Flow,
        now_ns: u64,
    ) -> Result<[(FlowKey, FlowEntry); 2], Refusal> {
        if flow.client.is_ipv4() != flow.vip.is_ipv4()
            || flow.snat.is_ipv4() != flow.server.is_ipv4()
        {
            return Err("mixed address families");
        }
        let (service_id, backend_id) =
            self.service_and_backend(&flow.service, flow.server.ip(), flow.server_port)?;
        let key = FlowKey {
            src_be: addr_words(flow.client.ip()),
            dst_be: addr_words(flow.vip.ip()),
            src_port_be: flow.client.port().to_be(),
            dst_port_be: flow.vip.port().to_be(),
            proto: flow.protocol,
            family: family(flow.client.ip()),
            _pad: 0,
        };
        let forward = FlowEntry {
            new_src_be: addr_words(flow.snat.ip()),
            new_dst_be: addr_words(flow.server.ip()),
            new_src_port_be: flow.snat.port().to_be(),
            new_dst_port_be: flow.server.port().to_be(),
            service_id,
            backend_id,
            ..self.entry(&flow.forward, flow, now_ns)
        };
        let reverse_key = forward.other_direction(&key);
        let mut reverse = FlowEntry {
            new_src_be: key.dst_be,
            new_dst_be: key.src_be,
            new_src_port_be: key.dst_port_be,
            new_dst_port_be: key.src_port_be,
            service_id,
            backend_id,
            ..self.entry(&flow.reverse, flow, now_ns)
        };
        reverse.flags |= FLOW_F_REVERSE;
        Ok([(key, forward), (reverse_key, reverse)])
    }

    /// The affinity a peer's flow implies (its service keeps affinities): the flow's client
    /// is bound to the flow's server, as of the flow's last packet.
    pub fn flow_affinity(
        &self,
        key: &FlowKey,
        forward: &FlowEntry,
    ) -> Option<(AffinityKey, AffinityEntry)> {
        if forward.flags & FLOW_F_TOUCH_AFFINITY == 0 {
            return None;
        }
        let with_port = forward.flags & FLOW_F_AFFINITY_PORT != 0;
        Some((
            AffinityKey {
                client_be: key.src_be,
                client_port_be: if with_port { key.src_port_be } else { 0 },
                family: key.family,
                _pad: 0,
                service_id: forward.service_id,
            },
            AffinityEntry {
                backend_id: forward.backend_id,
                new_flows: 1,
                last_seen_ns: forward.last_seen_ns,
            },
        ))
    }

    pub fn affinity_record(
        &self,
        key: &AffinityKey,
        entry: &AffinityEntry,
        now_ns: u64,
    ) -> Option<wire::Affinity> {
        let backend = self.backends.get(&entry.backend_id)?;
        Some(wire::Affinity {
            service: self.service_names.get(&key.service_id)?.clone(),
            client: addr_from_words(key.client_be, key.family),
            client_port: u16::from_be(key.client_port_be),
            server: backend.address,
            server_port: backend.port,
            idle_ms: ms_since(entry.last_seen_ns, now_ns),
        })
    }

    pub fn affinity_entry(
        &self,
        affinity: &wire::Affinity,
        now_ns: u64,
    ) -> Result<(AffinityKey, AffinityEntry), Refusal> {
        let (service_id, backend_id) =
            self.service_and_backend(&affinity.service, affinity.server, affinity.server_port)?;
        Ok((
            AffinityKey {
                client_be: addr_words(affinity.client),
                client_port_be: affinity.client_port.to_be(),
                family: family(affinity.client),
                _pad: 0,
                service_id,
            },
            AffinityEntry {
                backend_id,
                new_flows: 1,
                last_seen_ns: seen_at(affinity.idle_ms, now_ns),
            },
        ))
    }
}

/// A direction's tuple on the wire.
pub fn tuple(key: &FlowKey) -> wire::Tuple {
    wire::Tuple {
        protocol: key.proto,
        source: socket(key.src_be, key.src_port_be, key.family),
        destination: socket(key.dst_be, key.dst_port_be, key.family),
    }
}

/// The key of a tuple from the wire.
pub fn tuple_key(tuple: &wire::Tuple) -> Result<FlowKey, Refusal> {
    if tuple.source.is_ipv4() != tuple.destination.is_ipv4() {
        return Err("mixed address families");
    }
    Ok(FlowKey {
        src_be: addr_words(tuple.source.ip()),
        dst_be: addr_words(tuple.destination.ip()),
        src_port_be: tuple.source.port().to_be(),
        dst_port_be: tuple.destination.port().to_be(),
        proto: tuple.protocol,
        family: family(tuple.source.ip()),
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory(service_id: u32, backend_id: u32, interfaces: Vec<u32>) -> Directory {
        let identity = BackendIdentity {
            service: "web".into(),
            address: "10.2.0.11".parse().unwrap(),
            port: 4443,
        };
        Directory {
            service_ids: [("web".to_string(), service_id)].into(),
            service_names: [(service_id, "web".to_string())].into(),
            backend_ids: [(identity.clone(), backend_id)].into(),
            backends: [(backend_id, identity)].into(),
            interfaces,
        }
    }

    fn confirmed_flow(sender: &Directory) -> (FlowKey, FlowEntry, FlowEntry) {
        let flow = super::super::wire::tests::flow();
        let now = 100 * NS_PER_SEC;
        let [(key, forward), (_, reverse)] = sender.flow_entries(&flow, now).unwrap();
        (key, forward, reverse)
    }

    #[test]
    fn a_flow_crosses_between_nodes_that_number_differently() {
        let sender = directory(3, 17, vec![5, 6]);
        let receiver = directory(0, 2, vec![9, 8]);
        let (key, forward, reverse) = confirmed_flow(&sender);
        let now = 200 * NS_PER_SEC;
        let record = sender.flow_record(&key, &forward, &reverse, now).unwrap();
        let [(k, f), (rk, r)] = receiver.flow_entries(&record, now).unwrap();
        assert_eq!(k, key);
        assert_eq!((f.service_id, f.backend_id), (0, 2));
        assert_eq!(
            (f.new_src_be, f.new_dst_be),
            (forward.new_src_be, forward.new_dst_be)
        );
        assert_eq!(f.seq_next, forward.seq_next);
        assert_eq!(f.last_seen_ns, forward.last_seen_ns);
        // The interfaces keep their roles: position 0 and 1 of daemon.interfaces.
        assert_eq!((f.ingress_ifindex, r.ingress_ifindex), (9, 8));
        assert_eq!(rk, forward.other_direction(&key));
        assert_eq!(r.flags & FLOW_F_REVERSE, FLOW_F_REVERSE);
        assert_eq!(r.other_direction(&rk), key);
        assert_eq!(f.next_hop.generation, 0);
    }

    #[test]
    fn unknown_services_and_servers_are_refused() {
        let sender = directory(3, 17, vec![]);
        let (key, forward, reverse) = confirmed_flow(&sender);
        let mut record = sender.flow_record(&key, &forward, &reverse, 0).unwrap();
        record.server_port = 1;
        assert_eq!(sender.flow_entries(&record, 0), Err("unknown server"));
        record.service = "other".into();
        assert_eq!(sender.flow_entries(&record, 0), Err("unknown service"));
        record.snat = "[fd00::1]:1".parse().unwrap();
        assert_eq!(
            sender.flow_entries(&record, 0),
            Err("mixed address families")
        );
    }

    #[test]
    fn affinities_cross_by_name() {
        let sender = directory(3, 17, vec![]);
        let receiver = directory(0, 2, vec![]);
        let (key, forward, _) = confirmed_flow(&sender);
        let forward = FlowEntry {
            flags: forward.flags | FLOW_F_TOUCH_AFFINITY,
            ..forward
        };
        let (akey, aentry) = sender.flow_affinity(&key, &forward).unwrap();
        let record = sender
            .affinity_record(&akey, &aentry, 150 * NS_PER_SEC)
            .unwrap();
        let (rkey, rentry) = receiver.affinity_entry(&record, 150 * NS_PER_SEC).unwrap();
        assert_eq!((rkey.service_id, rentry.backend_id), (0, 2));
        assert_eq!(rkey.client_be, key.src_be);
        assert_eq!(rentry.last_seen_ns, aentry.last_seen_ns);
    }

    #[test]
    fn tuples_round_trip() {
        let (key, _, _) = confirmed_flow(&directory(3, 17, vec![]));
        assert_eq!(tuple_key(&tuple(&key)), Ok(key));
    }
}
