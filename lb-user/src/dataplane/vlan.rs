//! VLAN devices stacked on lb's interfaces. The kernel routes a backend or client behind a
//! VLAN out of the VLAN device; the data plane needs to know which interface that really is
//! and which tag to put on, so it can send the frame itself.
use std::path::Path;

use anyhow::{Context, Result};
use lb_common::VlanPort;

use crate::dataplane::ifindex;

/// The kernel's list of VLAN devices in this network namespace (module 8021q).
const PROC_VLAN_CONFIG: &str = "/proc/net/vlan/config";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanDevice {
    pub name: String,
    pub vid: u16,
    pub lower: String,
}

/// Parses `/proc/net/vlan/config`: two header lines, then `name | vid | lower` per device.
pub fn parse_config(text: &str) -> Vec<VlanDevice> {
    text.lines()
        .skip(2)
        .filter_map(|line| {
            let mut fields = line.split('|').map(str::trim);
            let (name, vid, lower) = (fields.next()?, fields.next()?, fields.next()?);
            Some(VlanDevice {
                name: name.to_string(),
                vid: vid.parse().ok()?,
                lower: lower.to_string(),
            })
        })
        .collect()
}

/// VLAN devices whose lower device is one of `interfaces`. No 8021q module, no VLANs.
pub fn devices_on(interfaces: &[String]) -> Result<Vec<VlanDevice>> {
    if !Path::new(PROC_VLAN_CONFIG).exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(PROC_VLAN_CONFIG)
        .with_context(|| format!("read {PROC_VLAN_CONFIG}"))?;
    Ok(parse_config(&text)
        .into_iter()
        .filter(|d| interfaces.contains(&d.lower))
        .collect())
}

/// The data plane's `LB_VLANS` entries for `devices`.
pub fn ports(devices: &[VlanDevice]) -> Result<Vec<(u32, VlanPort)>> {
    devices
        .iter()
        .map(|d| {
            Ok((
                ifindex(&d.name)?,
                VlanPort {
                    lower_ifindex: ifindex(&d.lower)?,
                    vid: d.vid,
                    _pad: 0,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_listing() {
        let text = "VLAN Dev name\t | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\n\
                    front.100      | 100  | front\nback.7         | 7  | back\n";
        assert_eq!(
            parse_config(text),
            vec![
                VlanDevice {
                    name: "front.100".into(),
                    vid: 100,
                    lower: "front".into()
                },
                VlanDevice {
                    name: "back.7".into(),
                    vid: 7,
                    lower: "back".into()
                },
            ]
        );
        assert!(parse_config("VLAN Dev name | VLAN ID\nName-Type: x\n").is_empty());
        assert!(parse_config("h\nh\nbroken line\nx | notanumber | y\n").is_empty());
    }
}
