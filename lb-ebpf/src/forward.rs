//! Sending a rewritten packet on: the kernel's FIB picks the egress interface and MACs.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        xdp_action::XDP_PASS,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
    EbpfContext,
};
use lb_common::Counter;

use crate::{
    maps::{scratch, TX_PORTS},
    parse::Packet,
    verdict::Verdict,
};

const AF_INET: u8 = 2;

/// Routes the (already rewritten) packet. An unresolved neighbour or an egress interface
/// without lb is handed to the kernel, which forwards it itself, so nothing is lost.
#[inline(always)]
pub fn forward_v4(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    // SAFETY: headers bounds-checked in `parse`.
    let (eth, ip, tcp) = unsafe { (&mut *pkt.eth, &*pkt.ip, &*pkt.tcp) };
    let ingress = ctx.ingress_ifindex() as u32;

    let Some(scratch) = scratch() else {
        return Verdict::drop(Counter::DropInternal);
    };
    let params = &mut scratch.fib;
    // SAFETY: all-zero is a valid value of this plain C struct.
    *params = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.proto;
    params.sport = u16::from_ne_bytes(tcp.source);
    params.dport = u16::from_ne_bytes(tcp.dest);
    params.__bindgen_anon_1.tot_len = pkt.ip_len;
    params.__bindgen_anon_2.tos = ip.tos;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    params.ifindex = ingress;

    // SAFETY: `params` is a valid, correctly sized bpf_fib_lookup for this helper.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            eth.dst_addr = params.dmac;
            eth.src_addr = params.smac;
            if params.ifindex == ingress {
                Verdict::tx()
            } else {
                match TX_PORTS.redirect(params.ifindex, u64::from(XDP_PASS)) {
                    Ok(_) => Verdict::redirect(),
                    Err(_) => Verdict::pass(Counter::PassEgressNotAttached),
                }
            }
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Verdict::pass(Counter::PassNoNeigh),
        _ => Verdict::drop(Counter::DropNoRoute),
    }
}
