//! `lb init --preset NAME`: a commented, valid config for one of the Lync / Skype for
//! Business VIPs, following Microsoft's load balancer requirements (docs/lync.md).
use std::net::IpAddr;

use anyhow::{bail, Context, Result};

use crate::{
    addr::SourcePrefix,
    cli::checks::{LYNC_MONITOR_PORT, LYNC_TCP_IDLE_TIMEOUT_S},
    config::Config,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// External Web Services VIP behind the reverse proxy: 443 -> 4443, 80 -> 8080.
    LyncWebExternal,
    /// Internal Web Services VIP: 443, 80, source affinity.
    LyncWebInternal,
    /// Front End pool VIP, every port of the pool as one service, source affinity.
    LyncFePool,
    /// Director pool VIP: 443, 444, 5061, 4443, source affinity.
    LyncDirector,
}

/// The addresses to write into the file; placeholders from the documentation range unless
/// given.
#[derive(Debug, Clone)]
pub struct Site {
    pub vip: IpAddr,
    pub servers: Vec<IpAddr>,
    pub snat: Vec<IpAddr>,
    pub interfaces: Vec<String>,
    /// Client prefixes each service admits (empty: any client).
    pub allow: Vec<SourcePrefix>,
}

impl Default for Site {
    fn default() -> Self {
        let doc = |last: u8| IpAddr::from([192, 0, 2, last]);
        Self {
            vip: doc(10),
            servers: vec![doc(11), doc(12), doc(13)],
            snat: vec![doc(100)],
            interfaces: vec!["eth0".into()],
            allow: Vec::new(),
        }
    }
}

/// Idle timeout for every preset: Microsoft's 1800 s TCP idle timeout plus a margin, so a
/// long-poll that is silent for exactly 1800 s is not cut.
const IDLE_TIMEOUT_S: u32 = LYNC_TCP_IDLE_TIMEOUT_S + 100;
/// Microsoft's older guidance: source affinity with 30-minute garbage collection.
const AFFINITY_TIMEOUT_S: u32 = 1800;
/// Ports per SNAT address with the default port range 1024..=65535.
const SNAT_PORTS: u32 = 65535 - 1024 + 1;

/// The config file text for `preset` at `site`; validated before it is returned.
pub fn render(preset: Preset, site: &Site) -> Result<String> {
    if site.servers.is_empty() || site.snat.is_empty() || site.interfaces.is_empty() {
        bail!("a preset needs at least one server, one SNAT address and one interface");
    }
    let mut text = header(preset, site);
    text += &match preset {
        Preset::LyncWebExternal => {
            service(
                site,
                ServiceShape {
                    name: "web-ext",
                    port: "443",
                    backend_port: Some(4443),
                    affinity: "source-port",
                    clients: Clients::ReverseProxies,
                    why: "# The reverse proxy forwards the external Web Services (Mcx, UCWA, Autodiscover)\n\
                          # here, so every client arrives from the proxy's address: source-address affinity\n\
                          # would put them all on one server (the mega-proxy case). Microsoft's Lync 2013\n\
                          # mobility requirements substitute TCP affinity (address + port, \"source-port\"\n\
                          # here) for cookie affinity. If clients reach this VIP directly, use \"source\".\n",
                },
            ) + &service(
                site,
                ServiceShape {
                    name: "web-ext-http",
                    port: "80",
                    backend_port: Some(8080),
                    affinity: "source-port",
                    clients: Clients::ReverseProxies,
                    why: "# Port 80 of the external Web Services, to the servers' 8080; same reasoning.\n",
                },
            )
        }
        Preset::LyncWebInternal => service(
            site,
            ServiceShape {
                name: "web-int",
                port: "[443, 80]",
                backend_port: None,
                affinity: "source",
                clients: Clients::Any,
                why: "# Internal Web Services on 443 and 80, as one service: clients connect directly, so\n\
                      # source-address affinity keeps each client on one Front End server for both ports.\n",
            },
        ),
        Preset::LyncFePool => service(
            site,
            ServiceShape {
                name: "fe-pool",
                port: r#"[5061, 444, 135, 80, 8080, 443, 4443, 448, "5070-5073", 5075, 5076, 5080]"#,
                backend_port: None,
                affinity: "source",
                clients: Clients::Any,
                why: "# Every Front End pool port (SIP 5061, 444, DCOM 135, web 80/8080/443/4443, 448,\n\
                      # 5070-5073, 5075, 5076, 5080) as one service: one server choice and one affinity\n\
                      # per client across all of them; each connection keeps its port on the server.\n",
            },
        ),
        Preset::LyncDirector => service(
            site,
            ServiceShape {
                name: "director",
                port: "[443, 444, 5061, 4443]",
                backend_port: None,
                affinity: "source",
                clients: Clients::Any,
                why: "# The Director pool's ports as one service, source-address affinity.\n",
            },
        ),
    };
    Config::parse(&text).context("the preset produced an invalid config (a bug in lb)")?;
    Ok(text)
}

fn quoted<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|i| format!("\"{}\"", i.to_string()))
        .collect();
    items.join(", ")
}

fn header(preset: Preset, site: &Site) -> String {
    let name = clap::ValueEnum::to_possible_value(&preset)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    let snat_families = [false, true]
        .iter()
        .map(|v6| site.snat.iter().filter(|a| a.is_ipv6() == *v6).count() as u32)
        .max()
        .unwrap_or(1);
    format!(
        "# lb: {name}, written by `lb init --preset {name}`.\n\
         # Check it with `lb config check FILE`; run it with `lb daemon --config FILE`.\n\
         \n\
         [daemon]\n\
         # The interfaces the XDP program attaches to: the client side and the server side\n\
         # (two-armed), or the one interface of a one-armed setup.\n\
         interfaces = [{interfaces}]\n\
         # Full NAT is required (servers connect to their own pool VIP): connections to the\n\
         # servers come from these addresses, local addresses of this box on the server side.\n\
         # One address carries about 65,000 concurrent connections to a server port.\n\
         snat_addresses = [{snat}]\n\
         # Two flow-table entries per connection: sized to what the SNAT addresses carry.\n\
         max_flows = {max_flows}\n",
        interfaces = quoted(&site.interfaces),
        snat = quoted(&site.snat),
        max_flows = 2 * SNAT_PORTS * snat_families,
    )
}

/// Who may reach the VIP: the external Web Services VIP is meant for the reverse proxies
/// only, so without `--allow` its preset says how to restrict it.
#[derive(Clone, Copy)]
enum Clients {
    ReverseProxies,
    Any,
}

fn source_list(site: &Site, clients: Clients) -> String {
    match (clients, site.allow.is_empty()) {
        (Clients::ReverseProxies, false) => format!(
            "# Only the reverse proxies reach this VIP: any other client's connection is refused\n\
             # (counted per service, and as drop_source_refused).\n\
             allow = [{}]\n",
            quoted(&site.allow)
        ),
        (Clients::ReverseProxies, true) => {
            "# Only the reverse proxies should reach this VIP: list their addresses to refuse any\n\
             # other client (lb init --allow), e.g.\n\
             # allow = [\"192.0.2.50\", \"192.0.2.51\"]\n"
                .to_string()
        }
        (Clients::Any, false) => format!(
            "# Only these clients may connect.\nallow = [{}]\n",
            quoted(&site.allow)
        ),
        (Clients::Any, true) => String::new(),
    }
}

struct ServiceShape<'a> {
    name: &'a str,
    port: &'a str,
    backend_port: Option<u16>,
    affinity: &'a str,
    clients: Clients,
    why: &'a str,
}

fn service(site: &Site, shape: ServiceShape) -> String {
    let ServiceShape {
        name,
        port,
        backend_port,
        affinity,
        clients,
        why,
    } = shape;
    let backend_port = backend_port
        .map(|p| format!("# The servers listen on {p} for this port.\nbackend_port = {p}\n"))
        .unwrap_or_default();
    let servers: Vec<String> = site
        .servers
        .iter()
        .map(|s| format!("  {{ address = \"{s}\" }},"))
        .collect();
    format!(
        "\n[[service]]\n\
         {why}\
         name = \"{name}\"\n\
         vip = \"{vip}\"\n\
         port = {port}\n\
         {backend_port}\
         {sources}\
         affinity = \"{affinity}\"\n\
         # Microsoft: 30-minute affinity garbage collection.\n\
         affinity_timeout = {AFFINITY_TIMEOUT_S}\n\
         # Microsoft's TCP idle timeout is {LYNC_TCP_IDLE_TIMEOUT_S} s and UCWA long-polls may be silent that long:\n\
         # a flow must outlive them.\n\
         idle_timeout = {IDLE_TIMEOUT_S}\n\
         # Monitor SIP on {LYNC_MONITOR_PORT}, not the balanced port: when the Front End service stops, IIS\n\
         # still answers, but the server must stop getting clients. Out after 3 failed checks\n\
         # 2 s apart, back after 2 good ones.\n\
         health = {{ kind = \"tcp\", port = {LYNC_MONITOR_PORT}, interval = 2.0, timeout = 1.0, rise = 2, fall = 3 }}\n\
         backends = [\n{servers}\n]\n",
        vip = site.vip,
        sources = source_list(site, clients),
        servers = servers.join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;
    use crate::cli::checks::warnings;

    #[test]
    fn every_preset_is_valid_and_passes_the_checks() {
        for preset in Preset::value_variants() {
            let text = render(*preset, &Site::default()).unwrap();
            let config = Config::parse(&text).unwrap();
            assert_eq!(warnings(&config), Vec::<String>::new(), "{preset:?}");
        }
    }

    #[test]
    fn presets_have_lync_ports() {
        let ports = |p| {
            let c = Config::parse(&render(p, &Site::default()).unwrap()).unwrap();
            c.services
                .iter()
                .map(|s| (s.ports(), s.backend_port()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ports(Preset::LyncWebExternal),
            [(vec![443], Some(4443)), (vec![80], Some(8080))]
        );
        assert_eq!(ports(Preset::LyncWebInternal), [(vec![443, 80], None)]);
        let fe = &ports(Preset::LyncFePool)[0];
        assert_eq!(fe.0.len(), 15);
        assert!(fe.0.contains(&5072) && fe.1.is_none());
        assert_eq!(
            ports(Preset::LyncDirector),
            [(vec![443, 444, 5061, 4443], None)]
        );
    }

    #[test]
    fn the_external_web_vip_is_restricted_to_the_proxies_given() {
        let open = render(Preset::LyncWebExternal, &Site::default()).unwrap();
        assert!(open.contains("# allow = ["), "{open}");
        let proxies: Vec<SourcePrefix> = vec!["192.0.2.50".parse().unwrap()];
        let site = Site {
            allow: proxies.clone(),
            ..Site::default()
        };
        let c = Config::parse(&render(Preset::LyncWebExternal, &site).unwrap()).unwrap();
        assert!(c.services.iter().all(|s| s.allow == proxies), "{c:?}");
    }

    #[test]
    fn site_addresses_are_used_and_checked() {
        let site = Site {
            vip: "10.100.0.1".parse().unwrap(),
            servers: vec!["10.2.0.11".parse().unwrap()],
            snat: vec!["10.2.0.100".parse().unwrap(), "10.2.0.101".parse().unwrap()],
            interfaces: vec!["front".into(), "back".into()],
            allow: Vec::new(),
        };
        let text = render(Preset::LyncDirector, &site).unwrap();
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.services[0].vip, site.vip);
        assert!(c.services[0].allow.is_empty());
        assert_eq!(c.daemon.interfaces, ["front", "back"]);
        assert_eq!(c.daemon.max_flows, 4 * SNAT_PORTS);
        let mixed = Site {
            servers: vec!["fd00:2::11".parse().unwrap()],
            ..site
        };
        let e = format!("{:#}", render(Preset::LyncDirector, &mixed).unwrap_err());
        assert!(e.contains("address family"), "{e}");
    }
}
