//! Sending a rewritten packet on: the kernel's FIB picks the egress interface and MACs (a
//! VLAN egress device resolved to its lower interface), cached per flow as a `NextHop`; the
//! tag is then set, added or removed.
use core::ptr::addr_of_mut;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action::XDP_PASS, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_xdp_adjust_head, generated::bpf_fib_lookup},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{Counter, NextHop, NEXT_HOP_UNTAGGED};
use network_types::eth::EthHdr;

use crate::{
    copy,
    maps::{fib_params, ROUTE_GENERATION, TX_PORTS, VLANS},
    parse::{ptr_at, Packet, L3, VLAN_TAG_LEN},
    verdict::Verdict,
    wire,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ETH_P_8021Q_BE: u16 = 0x8100_u16.to_be();
/// The VLAN id bits of a TCI; the rest (priority, DEI) is kept when retagging.
const VLAN_VID_MASK: u16 = 0x0fff;

/// The tag lb writes into a frame: TCI then the encapsulated EtherType, as on the wire.
#[repr(C)]
struct VlanTag {
    tci_be: u16,
    ether_type: u16,
}

/// A next hop that matches no generation, spelled out: `NextHop::default()` zeroes its MAC
/// arrays with a call to `memset` (see `copy`).
pub const NO_NEXT_HOP: NextHop = NextHop {
    generation: 0,
    ifindex: 0,
    dmac: [0, 0, 0, 0, 0, 0],
    smac: [0, 0, 0, 0, 0, 0],
    vid: NEXT_HOP_UNTAGGED,
    mtu: 0,
};

/// Routes the (already rewritten) packet of no cached flow: a route lookup, then send.
// Out of line: its own stack frame (see "Stack" in README.md).
#[inline(never)]
pub fn forward(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    let mut hop = NO_NEXT_HOP;
    if let Err(verdict) = next_hop(ctx, pkt, &mut hop) {
        return verdict;
    }
    send(ctx, pkt, &hop)
}

/// Makes `hop` the next hop of the (already rewritten) packet: kept as it is while the
/// routing generation it was filled in still holds and the packet fits its MTU, else
/// filled from a route lookup. An unresolved neighbour is the kernel's to forward (and
/// resolve), so nothing is lost.
#[inline(always)]
pub fn next_hop(ctx: &XdpContext, pkt: &Packet, hop: &mut NextHop) -> Result<(), Verdict> {
    let generation = ROUTE_GENERATION.get(0).copied().unwrap_or(0);
    if hop.generation == generation && generation != 0 && pkt.ip_len <= hop.mtu {
        return Ok(());
    }
    let mut refused = Verdict::drop(Counter::DropInternal);
    if lookup(ctx, pkt, hop, generation, &mut refused) {
        Ok(())
    } else {
        Err(refused)
    }
}

/// Fills `hop` from a route lookup, or says in `refused` why the packet cannot go. Out of
/// line, with its own stack frame; a plain bool result, since a returned struct comes
/// back as a pointer into the caller's stack, which the verifier refuses.
#[inline(never)]
fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    hop: &mut NextHop,
    generation: u32,
    refused: &mut Verdict,
) -> bool {
    let Some(params) = fib_params() else {
        return false;
    };
    copy::zero(params);
    params.l4_protocol = pkt.key.proto;
    params.sport = pkt.key.src_port_be;
    params.dport = pkt.key.dst_port_be;
    params.__bindgen_anon_1.tot_len = pkt.ip_len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    match pkt.l3 {
        L3::V4(ip) => {
            // SAFETY: bounds-checked in `parse`.
            let ip = unsafe { &*ip };
            params.family = AF_INET;
            params.__bindgen_anon_2.tos = ip.tos;
            params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
            params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
        }
        L3::V6(ip) => {
            // SAFETY: bounds-checked in `parse`.
            let ip = unsafe { &*ip };
            params.family = AF_INET6;
            params.__bindgen_anon_3.ipv6_src = lb_common::v6_words(ip.src_addr);
            params.__bindgen_anon_4.ipv6_dst = lb_common::v6_words(ip.dst_addr);
        }
    }

    // SAFETY: `params` is a valid, correctly sized bpf_fib_lookup for this helper.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    *refused = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => *refused,
        BPF_FIB_LKUP_RET_NO_NEIGH => Verdict::pass(Counter::PassNoNeigh),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Verdict::drop(Counter::DropOverMtu),
        _ => Verdict::drop(Counter::DropNoRoute),
    };
    if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS {
        return false;
    }
    let (ifindex, vid) = match VLANS.get_ptr(&params.ifindex) {
        // SAFETY: map value pointer from a successful lookup.
        Some(port) => unsafe { ((*port).lower_ifindex, (*port).vid) },
        None => (params.ifindex, NEXT_HOP_UNTAGGED),
    };
    *hop = NextHop {
        generation,
        ifindex,
        dmac: params.dmac,
        smac: params.smac,
        vid,
        // SAFETY: on success the helper writes the route's MTU over `tot_len`.
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
    };
    true
}

/// Writes the link header for `hop` and sends the packet out of its interface.
// Out of line: its VLAN cases would multiply the verifier's paths through every caller.
#[inline(never)]
pub fn send(ctx: &XdpContext, pkt: &Packet, hop: &NextHop) -> Verdict {
    let vid = (hop.vid != NEXT_HOP_UNTAGGED).then_some(hop.vid);
    if !set_link_header(ctx, pkt.tagged, vid, &hop.dmac, &hop.smac) {
        return Verdict::drop(Counter::DropInternal);
    }
    if hop.ifindex == ctx.ingress_ifindex() as u32 {
        Verdict::tx()
    } else {
        match TX_PORTS.redirect(hop.ifindex, u64::from(XDP_PASS)) {
            Ok(_) => Verdict::redirect(),
            Err(_) => Verdict::pass(Counter::PassEgressNotAttached),
        }
    }
}

/// Writes the next hop's MACs and makes the frame carry `vid` (or no tag), growing or
/// shrinking the head by one tag when the tagging changes. False if the frame cannot be
/// resized, which XDP's fixed headroom makes impossible in practice.
#[inline(always)]
fn set_link_header(
    ctx: &XdpContext,
    tagged: bool,
    vid: Option<u16>,
    dmac: &[u8; 6],
    smac: &[u8; 6],
) -> bool {
    match (tagged, vid) {
        (true, Some(vid)) => {
            let Some(tag) = ptr_at::<VlanTag>(ctx, EthHdr::LEN) else {
                return false;
            };
            // SAFETY: bounds-checked just above.
            let tag = unsafe { &mut *tag };
            let tci = u16::from_be(tag.tci_be) & !VLAN_VID_MASK | vid & VLAN_VID_MASK;
            tag.tci_be = tci.to_be();
        }
        (false, None) => {}
        (true, None) => {
            // Pop: the encapsulated EtherType becomes the frame's; the MACs are rewritten below.
            let Some(tag) = ptr_at::<VlanTag>(ctx, EthHdr::LEN) else {
                return false;
            };
            // SAFETY: bounds-checked just above.
            let inner = unsafe { (*tag).ether_type };
            // SAFETY: the context is valid; the helper checks the new head itself.
            if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, VLAN_TAG_LEN as i32) } != 0 {
                return false;
            }
            let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
                return false;
            };
            // SAFETY: bounds-checked just above.
            unsafe { (*eth).ether_type = inner };
        }
        (false, Some(vid)) => {
            // Push: the old EtherType moves into the tag.
            let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
                return false;
            };
            // SAFETY: bounds-checked just above.
            let inner = unsafe { (*eth).ether_type };
            // SAFETY: as above.
            if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(VLAN_TAG_LEN as i32)) } != 0 {
                return false;
            }
            let (Some(eth), Some(tag)) = (
                ptr_at::<EthHdr>(ctx, 0),
                ptr_at::<VlanTag>(ctx, EthHdr::LEN),
            ) else {
                return false;
            };
            // SAFETY: bounds-checked just above.
            unsafe {
                (*eth).ether_type = ETH_P_8021Q_BE;
                (*tag).tci_be = (vid & VLAN_VID_MASK).to_be();
                (*tag).ether_type = inner;
            }
        }
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds-checked just above.
    unsafe {
        wire::store_mac(addr_of_mut!((*eth).dst_addr), dmac);
        wire::store_mac(addr_of_mut!((*eth).src_addr), smac);
    }
    true
}
