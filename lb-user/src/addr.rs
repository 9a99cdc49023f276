//! Addresses between their Rust form and the data plane's (four 32-bit words in network
//! byte order plus a family, see lb-common), and as shown to people.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use lb_common::{FAMILY_V4, FAMILY_V6};
use serde::{Deserialize, Serialize};

pub fn addr_words(addr: IpAddr) -> [u32; 4] {
    match addr {
        IpAddr::V4(a) => lb_common::v4_words(u32::from_ne_bytes(a.octets())),
        IpAddr::V6(a) => lb_common::v6_words(a.octets()),
    }
}

pub fn addr_from_words(words: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(lb_common::v6_bytes(words)))
    } else {
        IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
    }
}

pub fn family(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

/// A server as shown: "address:port", or the address alone for a multi-port service's
/// server (`BACKEND_PORT_KEEP`).
pub fn endpoint(address: IpAddr, port: u16) -> String {
    if port == lb_common::BACKEND_PORT_KEEP {
        address.to_string()
    } else {
        std::net::SocketAddr::new(address, port).to_string()
    }
}

/// A client prefix of a service's `allow` or `deny` list: `10.0.0.0/8`, `fd00:1::/64`, or a
/// bare address (one host). In the config and in JSON as that text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourcePrefix(IpNet);

impl SourcePrefix {
    /// `None` when `len` is longer than the address.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        IpNet::new(addr, len).ok().map(Self)
    }

    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The prefix with its host bits cleared, when they are not already.
    pub fn without_host_bits(&self) -> Option<Self> {
        let network = self.0.trunc();
        (network != self.0).then_some(Self(network))
    }
}

impl std::str::FromStr for SourcePrefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let net = match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => text.parse::<IpNet>().map_err(|_| {
                format!("{text:?} is not a prefix: expected 10.0.0.0/8, fd00:1::/64 or an address")
            })?,
        };
        Ok(Self(net))
    }
}

impl TryFrom<String> for SourcePrefix {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<SourcePrefix> for String {
    fn from(p: SourcePrefix) -> Self {
        p.to_string()
    }
}

impl std::fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Every address on this host's interfaces (in the current network namespace).
pub fn local_addresses() -> std::io::Result<BTreeSet<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut found = BTreeSet::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned; its address, when present, is a
        // sockaddr of the family it says.
        unsafe {
            let addr = (*at).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*addr.cast::<libc::sockaddr_in>();
                        found.insert(IpAddr::V4(Ipv4Addr::from(
                            sin.sin_addr.s_addr.to_ne_bytes(),
                        )));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*addr.cast::<libc::sockaddr_in6>();
                        found.insert(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            at = (*at).ifa_next;
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_survive_the_data_plane_form() {
        for text in ["10.2.0.11", "192.0.2.255", "fd00::1", "2001:db8::ff:1"] {
            let addr: IpAddr = text.parse().unwrap();
            assert_eq!(addr_from_words(addr_words(addr), family(addr)), addr);
        }
        // IPv4 uses word 0 only, as the data plane expects.
        assert_eq!(addr_words("10.0.0.1".parse().unwrap())[1..], [0, 0, 0]);
    }

    #[test]
    fn source_prefixes_read_as_admins_write_them() {
        let p: SourcePrefix = "10.1.0.0/16".parse().unwrap();
        assert_eq!(
            (p.addr(), p.prefix_len()),
            ("10.1.0.0".parse().unwrap(), 16)
        );
        let host: SourcePrefix = "fd00::7".parse().unwrap();
        assert_eq!(
            (host.to_string().as_str(), host.prefix_len()),
            ("fd00::7/128", 128)
        );
        let sloppy: SourcePrefix = "10.1.2.3/16".parse().unwrap();
        assert_eq!(sloppy.without_host_bits(), Some(p));
        assert_eq!(p.without_host_bits(), None);
        let err = "10.0.0.0/33".parse::<SourcePrefix>().unwrap_err();
        assert!(err.contains("expected 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn loopback_is_a_local_address() {
        let local = local_addresses().unwrap();
        assert!(
            local.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{local:?}"
        );
    }

    #[test]
    fn a_multi_port_services_server_is_shown_without_a_port() {
        let addr: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(endpoint(addr, 4443), "[fd00::2]:4443");
        assert_eq!(endpoint(addr, lb_common::BACKEND_PORT_KEEP), "fd00::2");
    }
}
