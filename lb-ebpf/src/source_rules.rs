//! A service's `allow` / `deny` lists of client prefixes, consulted when a flow opens: the
//! longest matching prefix decides; a client no prefix matches is refused only by a
//! service that has allows. Services without rules never touch the trie.
use lb_common::{
    FlowKey, Service, SourceRuleKey, SERVICE_F_ALLOW_LIST, SERVICE_F_SOURCE_RULES, SOURCE_ALLOW,
    SOURCE_RULE_HEADER_BITS,
};

use crate::{
    copy,
    maps::{SourceRuleLookup, SOURCE_RULES},
};

/// Bits of a full-length lookup: the service id and family, then the whole address (an
/// IPv4 client's unused words are zero, below every IPv4 rule's prefix).
const LOOKUP_BITS: u32 = SOURCE_RULE_HEADER_BITS + 128;

/// May `flow`'s client open a flow to `service`?
#[inline(always)]
pub fn admits(service: &Service, flow: &FlowKey) -> bool {
    if service.flags & SERVICE_F_SOURCE_RULES == 0 {
        return true;
    }
    let lookup = SourceRuleLookup::new(
        LOOKUP_BITS,
        SourceRuleKey {
            service_id: service.id,
            family: u32::from(flow.family),
            addr_be: copy::words(&flow.src_be),
        },
    );
    match SOURCE_RULES.get(&lookup) {
        Some(action) => *action == SOURCE_ALLOW,
        None => service.flags & SERVICE_F_ALLOW_LIST == 0,
    }
}
