//! `lb config check` warnings: configurations that are valid but fall into the known traps
//! of balancing a Lync / Skype for Business pool (docs/lync.md, section 7).
use crate::config::{Affinity, Config, ServiceConfig};

/// Lync's SIP port: the health monitor Microsoft prescribes for every pool VIP.
pub const LYNC_MONITOR_PORT: u16 = 5061;
/// Microsoft's TCP idle timeout, which UCWA long-polls may use to the full.
pub const LYNC_TCP_IDLE_TIMEOUT_S: u32 = 1800;
/// The external Web Services VIP's port translations (the reverse proxy forwards here).
const EXTERNAL_WEB_TRANSLATIONS: [(u16, u16); 2] = [(443, 4443), (80, 8080)];

/// One warning per trap found, each naming the service or key and what to do.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut found = Vec::new();
    for s in &config.services {
        let at = format!("service {:?}", s.name);
        if s.affinity == Affinity::Source && is_external_web(s) {
            found.push(format!(
                "{at}: {} -> {} looks like the external Web Services VIP, which sits behind the reverse proxy: with affinity \"source\" every client arrives from the proxy's address and all land on one server (the mega-proxy case). Use affinity \"source-port\" (Microsoft's TCP affinity), unless clients reach this VIP directly.",
                s.port,
                s.backend_port().unwrap_or_default()
            ));
        }
        if s.idle_timeout <= LYNC_TCP_IDLE_TIMEOUT_S {
            found.push(format!(
                "{at}: idle_timeout = {} s: UCWA long-polls and idle mobile connections may stay silent for {LYNC_TCP_IDLE_TIMEOUT_S} s (Microsoft's TCP idle timeout), and a flow that expires first is cut. Use more than {LYNC_TCP_IDLE_TIMEOUT_S} (e.g. 1900).",
                s.idle_timeout
            ));
        }
        match &s.health {
            None => found.push(format!(
                "{at}: no health checks: a server whose Front End service stopped keeps getting new clients. Add health = {{ kind = \"tcp\", port = {LYNC_MONITOR_PORT} }}."
            )),
            Some(_) => {
                let monitored =
                    s.health_port(s.backend_port().unwrap_or(lb_common::BACKEND_PORT_KEEP));
                if monitored != LYNC_MONITOR_PORT {
                    found.push(format!(
                        "{at}: health checks probe port {monitored}: IIS keeps answering there when the Front End service (SIP) has stopped. Monitor port {LYNC_MONITOR_PORT} instead (health.port = {LYNC_MONITOR_PORT})."
                    ));
                }
            }
        }
    }
    found.extend(snat_capacity(config));
    found
}

/// Two nodes of one scale-out group: the same services (so the same Maglev tables and
/// choices for every client), and no SNAT address in common (two nodes translating to the
/// same address and port toward a server would break each other's connections).
pub fn same_group(node: &Config, peer: &Config) -> anyhow::Result<()> {
    let shared: Vec<String> = node
        .daemon
        .snat_addresses
        .iter()
        .filter(|a| peer.daemon.snat_addresses.contains(a))
        .map(ToString::to_string)
        .collect();
    if !shared.is_empty() {
        anyhow::bail!(
            "daemon.snat_addresses: {} used by both nodes; each node needs its own",
            shared.join(", ")
        );
    }
    if node.services != peer.services {
        let names =
            |c: &Config| -> Vec<String> { c.services.iter().map(|s| s.name.clone()).collect() };
        let differing: Vec<String> = node
            .services
            .iter()
            .filter(|s| !peer.services.contains(s))
            .map(|s| s.name.clone())
            .collect();
        anyhow::bail!(
            "the services differ ({}; services {:?} vs {:?}): the nodes would build different Maglev tables and move clients between servers as the router moves them between nodes",
            if differing.is_empty() { "order or count".to_string() } else { format!("{} differ", differing.join(", ")) },
            names(node),
            names(peer)
        );
    }
    Ok(())
}

/// A service translating 443 -> 4443 or 80 -> 8080.
fn is_external_web(s: &ServiceConfig) -> bool {
    let ports = s.ports();
    EXTERNAL_WEB_TRANSLATIONS
        .iter()
        .any(|&(front, back)| ports == [front] && s.backend_port() == Some(back))
}

/// The flow table is sized for more concurrent connections than the SNAT addresses of a
/// family can carry (Microsoft: one SNAT address per ~65,000 connections).
fn snat_capacity(config: &Config) -> Vec<String> {
    let d = &config.daemon;
    // Two flow-table entries per connection, one per direction.
    let sized_for = u64::from(d.max_flows) / 2;
    let ports = u64::from(d.snat_port_max.saturating_sub(d.snat_port_min)) + 1;
    let mut found = Vec::new();
    for (family, is_v6) in [("IPv4", false), ("IPv6", true)] {
        if !config.services.iter().any(|s| s.vip.is_ipv6() == is_v6) {
            continue;
        }
        let addresses = d
            .snat_addresses
            .iter()
            .filter(|a| a.is_ipv6() == is_v6)
            .count() as u64;
        let carries = addresses * ports;
        if sized_for > carries {
            found.push(format!(
                "daemon.snat_addresses: {addresses} {family} address(es) x {ports} ports carry about {carries} concurrent connections to a server port, but daemon.max_flows = {} is sized for {sized_for}: new connections beyond that are refused (drop_snat_exhausted). Add SNAT addresses (one per ~65,000 connections) or lower max_flows.",
                d.max_flows
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::MINIMAL;

    /// MINIMAL made clean: monitored on 5061, a flow table one SNAT address can serve.
    fn clean() -> String {
        MINIMAL
            .replace(
                "port = 443\n",
                "port = 443\naffinity = \"none\"\nhealth = { kind = \"tcp\", port = 5061 }\n",
            )
            .replace(
                "snat_addresses = [\"10.2.0.100\"]",
                "snat_addresses = [\"10.2.0.100\"]\nmax_flows = 100000",
            )
    }

    fn warnings_of(text: &str) -> Vec<String> {
        warnings(&Config::parse(text).unwrap())
    }

    #[test]
    fn a_clean_config_has_no_warnings() {
        assert_eq!(warnings_of(&clean()), Vec::<String>::new());
    }

    #[test]
    fn nodes_of_a_group_need_the_same_services_and_their_own_snat() {
        let node = Config::parse(&clean()).unwrap();
        let peer = Config::parse(&clean().replace("10.2.0.100", "10.2.0.101")).unwrap();
        same_group(&node, &peer).unwrap();
        let e = format!("{:#}", same_group(&node, &node).unwrap_err());
        assert!(e.contains("10.2.0.100 used by both nodes"), "{e}");
        let other = Config::parse(
            &clean()
                .replace("10.2.0.100", "10.2.0.101")
                .replace("weight = 2", "weight = 3"),
        )
        .unwrap();
        let e = format!("{:#}", same_group(&node, &other).unwrap_err());
        assert!(e.contains("web-ext differ"), "{e}");
    }

    #[test]
    fn each_trap_is_named() {
        let cases = [
            (
                clean().replace("affinity = \"none\"", "affinity = \"source\""),
                "mega-proxy",
            ),
            (
                clean().replace(
                    "affinity = \"none\"",
                    "affinity = \"none\"\nidle_timeout = 1800",
                ),
                "idle_timeout = 1800 s",
            ),
            (
                clean().replace("max_flows = 100000", "max_flows = 1000000"),
                "1 IPv4 address(es) x 64512 ports",
            ),
            (
                clean().replace(", port = 5061", ""),
                "health checks probe port 4443",
            ),
            (
                clean().replace("health = { kind = \"tcp\", port = 5061 }\n", ""),
                "no health checks",
            ),
        ];
        for (text, expected) in cases {
            let found = warnings_of(&text);
            assert!(
                found.len() == 1 && found[0].contains(expected),
                "expected one warning with {expected:?}, got {found:?}"
            );
        }
    }
}
