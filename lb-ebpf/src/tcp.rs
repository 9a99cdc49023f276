//! What lb believes of a TCP segment, so that a sender who never sees the traffic (a blind
//! spoofer) can neither confirm a flow nor close one:
//! - a handshake is confirmed only by the ACK that acknowledges the server's SYN-ACK
//!   (ack = server ISN + 1, which lb learns from the SYN-ACK on the return path);
//! - a SYN-ACK must acknowledge the client's SYN (ack = client ISN + 1);
//! - a FIN or RST changes a flow's state only if its sequence number is within
//!   `CLOSE_WINDOW` of what its sender has sent so far, as lb saw it (RFC 5961 asks the
//!   receiver for its window; a sender's own RST or FIN carries exactly that number).
//!   A blind guess lands with probability 2 x 65535 / 2^32, 1 in 32768.
use lb_common::{seq, FlowEntry, FLOW_F_SEQ_KNOWN, FLOW_F_SYNACK_SEEN};

use crate::parse::Packet;

/// The largest window a TCP peer can offer without window scaling.
const CLOSE_WINDOW: u32 = 65_535;

/// May this FIN or RST change the state of `entry`'s direction?
#[inline(always)]
pub fn close_believable(pkt: &Packet, entry: &FlowEntry) -> bool {
    if entry.flags & FLOW_F_SEQ_KNOWN == 0 {
        // The server's side before its SYN-ACK: a refusal must acknowledge the SYN.
        return pkt.has_ack() && pkt.tcp_ack == entry.handshake_ack;
    }
    seq::within(pkt.tcp_seq, entry.seq_next, CLOSE_WINDOW)
}

/// Moves the sender's next sequence number past this segment (never back).
#[inline(always)]
pub fn track(pkt: &Packet, entry: &mut FlowEntry) {
    if entry.flags & FLOW_F_SEQ_KNOWN == 0 {
        return;
    }
    let end = pkt.tcp_seq_end();
    if seq::after(end, entry.seq_next) {
        entry.seq_next = end;
    }
}

/// What an ACK from the client on a half-open flow proves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ClientAck {
    /// It acknowledges the server's SYN-ACK: the client is real.
    Confirms,
    /// It acknowledges later server data (the flow stayed half-open, e.g. a full table).
    Follows,
    /// It acknowledges nothing the server sent: a blind spoofer's.
    Blind,
}

#[inline(always)]
pub fn client_ack(pkt: &Packet, entry: &FlowEntry) -> ClientAck {
    if entry.flags & FLOW_F_SYNACK_SEEN == 0 {
        return ClientAck::Blind;
    }
    if pkt.tcp_ack == entry.handshake_ack {
        ClientAck::Confirms
    } else if pkt.tcp_ack.wrapping_sub(entry.handshake_ack) <= CLOSE_WINDOW {
        ClientAck::Follows
    } else {
        ClientAck::Blind
    }
}
