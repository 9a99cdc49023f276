//! What a sync frame carries: a batch of records in postcard's encoding. Records name
//! services and servers as the config does (service name, server address and port) and
//! flows by their tuples, never by a node's own ids, so nodes may number them differently.
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Records per frame at most: a frame stays well below `session::MAX_FRAME`.
pub const RECORDS_PER_FRAME: usize = 2048;

/// One direction's TCP and timing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Direction {
    /// `lb_common::FLOW_F_*` bits of `WIRE_FLAGS`.
    pub flags: u32,
    pub timeout_s: u32,
    pub seq_next: u32,
    pub handshake_ack: u32,
    /// Milliseconds since the sender last saw a packet of this direction.
    pub idle_ms: u32,
    /// The sender's interface packets of this direction arrive on, as its position in
    /// `daemon.interfaces`; `NO_INTERFACE` when not known.
    pub interface: u8,
}

pub const NO_INTERFACE: u8 = u8::MAX;

/// A confirmed connection: enough for the receiver to rebuild both directions' entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub service: String,
    pub protocol: u8,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub snat: SocketAddr,
    /// The server's address and translated port.
    pub server: SocketAddr,
    /// The server's port as `lb status` names it (its configured port).
    pub server_port: u16,
    pub idle_timeout_s: u32,
    pub forward: Direction,
    pub reverse: Direction,
}

/// A flow direction's tuple, as its packets carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tuple {
    pub protocol: u8,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// A client's affinity to a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    pub service: String,
    pub client: IpAddr,
    /// Zero unless the service's affinity includes the client's port.
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
    pub idle_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Flow(Flow),
    /// This flow direction is gone (closed or expired on the sender).
    FlowRemoved(Tuple),
    Affinity(Affinity),
    /// The records before this one were a full snapshot of the sender's state.
    SnapshotDone,
}

/// What one sealed frame carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The sender's clock when it sent the frame (Unix microseconds): with a flow's
    /// `idle_ms`, how long the peer's view lags (nodes keep their clocks by NTP).
    pub sent_unix_us: u64,
    /// A piece of a snapshot or reconciliation round, not new state: its records' age says
    /// nothing of the sync's latency.
    pub bulk: bool,
    pub records: Vec<Record>,
}

pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A frame of `records`, stamped now.
pub fn encode(records: &[Record], bulk: bool) -> Result<Vec<u8>> {
    let frame = Frame {
        sent_unix_us: unix_now_us(),
        bulk,
        records: records.to_vec(),
    };
    postcard::to_allocvec(&frame).context("encoding sync records")
}

/// An authenticated frame's contents; an error if they do not decode (a sender of
/// another build that kept the version, or a bug): the frame changes nothing.
pub fn decode(body: &[u8]) -> Result<Frame> {
    let frame: Frame = postcard::from_bytes(body).context("decoding sync records")?;
    if frame.records.len() > RECORDS_PER_FRAME {
        anyhow::bail!("{} records in one frame", frame.records.len());
    }
    Ok(frame)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub fn flow() -> Flow {
        let direction = Direction {
            flags: 4,
            timeout_s: 1800,
            seq_next: 1000,
            handshake_ack: 0,
            idle_ms: 5,
            interface: 0,
        };
        Flow {
            service: "web".into(),
            protocol: 6,
            client: "10.1.0.9:40000".parse().unwrap(),
            vip: "10.1.0.100:443".parse().unwrap(),
            snat: "10.2.0.100:20000".parse().unwrap(),
            server: "10.2.0.11:4443".parse().unwrap(),
            server_port: 4443,
            idle_timeout_s: 1800,
            forward: direction,
            reverse: Direction {
                interface: 1,
                ..direction
            },
        }
    }

    #[test]
    fn records_round_trip() {
        let records = vec![
            Record::Flow(flow()),
            Record::FlowRemoved(Tuple {
                protocol: 6,
                source: "10.1.0.9:40000".parse().unwrap(),
                destination: "10.1.0.100:443".parse().unwrap(),
            }),
            Record::SnapshotDone,
        ];
        let frame = decode(&encode(&records, false).unwrap()).unwrap();
        assert_eq!(frame.records, records);
        assert!(frame.sent_unix_us.abs_diff(unix_now_us()) < 60_000_000);
    }

    #[test]
    fn garbage_and_truncation_do_not_decode() {
        let body = encode(&[Record::Flow(flow())], true).unwrap();
        assert!(decode(&body[..body.len() - 3]).is_err());
        assert!(decode(&[0xff; 64]).is_err());
    }
}
