//! Addresses between their Rust form and the data plane's (four 32-bit words in network
//! byte order plus a family, see lb-common), and as shown to people.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{FAMILY_V4, FAMILY_V6};

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
