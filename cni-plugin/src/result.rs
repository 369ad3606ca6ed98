//! What the plugin prints on success, shaped for the cniVersion the runtime
//! asked for.

use std::net::IpAddr;

use serde_json::{json, Value};

use crate::config::CniVersion;

/// The facts of one plumbed attachment, independent of the result version.
#[derive(Debug, Clone, PartialEq)]
pub struct AddResult {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
    /// The CNI_NETNS path.
    pub sandbox: String,
    pub mtu: Option<u32>,
    pub ip: IpAddr,
    pub prefix_len: u8,
    pub gateway: IpAddr,
    pub dns: Option<Value>,
}

impl AddResult {
    /// Renders the result. 0.3.x and 0.4.0 carry "version" on each IP; 1.1.0
    /// adds the interfaces' MTU; the rest is the same in every version.
    pub fn render(&self, version: CniVersion) -> Value {
        let with_mtu = version >= CniVersion::V1_1_0;
        let mut host = json!({ "name": self.host_ifname, "mac": self.host_mac });
        let mut pod = json!({ "name": self.pod_ifname, "mac": self.pod_mac, "sandbox": self.sandbox });
        if let (true, Some(mtu)) = (with_mtu, self.mtu) {
            host["mtu"] = json!(mtu);
            pod["mtu"] = json!(mtu);
        }
        let mut ip = json!({
            "address": format!("{}/{}", self.ip, self.prefix_len),
            "gateway": self.gateway.to_string(),
            "interface": 1,
        });
        if version.ips_carry_version() {
            ip["version"] = json!(if self.ip.is_ipv4() { "4" } else { "6" });
        }
        let default_dst = if self.ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
        json!({
            "cniVersion": version.as_str(),
            "interfaces": [host, pod],
            "ips": [ip],
            "routes": [{ "dst": default_dst, "gw": self.gateway.to_string() }],
            "dns": self.dns.clone().unwrap_or_else(|| json!({})),
        })
    }
}

/// What a `prevResult` says about one address: its gateway, and whether the
/// result still lists a default route (a later plugin in the chain may have
/// changed routes, which CNI 1.1 CHECK "must allow for").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub gateway: Option<IpAddr>,
    pub default_route: bool,
}

/// Reads the entry for `ip` from a `prevResult`. `Err` says how the result
/// disagrees (no such address, or not a result at all).
pub fn expected_from_prev(prev: &Value, ip: IpAddr) -> Result<Expected, String> {
    let ips = prev
        .get("ips")
        .and_then(Value::as_array)
        .ok_or("prevResult has no \"ips\" list")?;
    let listed: Vec<&str> = ips.iter().filter_map(|e| e.get("address")?.as_str()).collect();
    let entry = ips
        .iter()
        .find(|e| {
            e.get("address")
                .and_then(Value::as_str)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
                == Some(ip)
        })
        .ok_or_else(|| format!("prevResult lists {listed:?} but the pod's address is {ip}"))?;
    let gateway = match entry.get("gateway").and_then(Value::as_str) {
        Some(g) => Some(
            g.parse()
                .map_err(|_| format!("prevResult has the invalid gateway {g:?}"))?,
        ),
        None => None,
    };
    let default_dst = if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
    let default_route = prev.get("routes").and_then(Value::as_array).is_some_and(|rs| {
        rs.iter()
            .any(|r| r.get("dst").and_then(Value::as_str) == Some(default_dst))
    });
    Ok(Expected { gateway, default_route })
}

/// The VERSION answer.
pub fn version_info() -> Value {
    json!({
        "cniVersion": CniVersion::LATEST.as_str(),
        "supportedVersions": CniVersion::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            host_ifname: "lxc0123456789a".into(),
            host_mac: "aa:aa:aa:aa:aa:01".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "bb:bb:bb:bb:bb:02".into(),
            sandbox: "/var/run/netns/cni-1".into(),
            mtu: Some(1450),
            ip: "10.250.0.7".parse().unwrap(),
            prefix_len: 32,
            gateway: "10.250.0.1".parse().unwrap(),
            dns: None,
        }
    }

    #[test]
    fn v1_1_shape() {
        let r = sample().render(CniVersion::V1_1_0);
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "lxc0123456789a", "mac": "aa:aa:aa:aa:aa:01", "mtu": 1450},
                    {"name": "eth0", "mac": "bb:bb:bb:bb:bb:02", "sandbox": "/var/run/netns/cni-1", "mtu": 1450}
                ],
                "ips": [{"address": "10.250.0.7/32", "gateway": "10.250.0.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.250.0.1"}],
                "dns": {}
            })
        );
    }

    #[test]
    fn v1_0_has_no_mtu_and_no_ip_version() {
        let r = sample().render(CniVersion::V1_0_0);
        assert_eq!(r["cniVersion"], "1.0.0");
        assert!(r["interfaces"][0].get("mtu").is_none());
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(r["ips"][0]["interface"], 1);
    }

    #[test]
    fn legacy_versions_carry_ip_version() {
        for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let r = sample().render(v);
            assert_eq!(r["cniVersion"], v.as_str());
            assert_eq!(r["ips"][0]["version"], "4");
            assert_eq!(r["ips"][0]["address"], "10.250.0.7/32");
        }
    }

    #[test]
    fn ipv6_result() {
        let mut s = sample();
        s.ip = "fd00::7".parse().unwrap();
        s.prefix_len = 128;
        s.gateway = "fd00::1".parse().unwrap();
        let r = s.render(CniVersion::V0_4_0);
        assert_eq!(r["ips"][0]["version"], "6");
        assert_eq!(r["ips"][0]["address"], "fd00::7/128");
        assert_eq!(r["routes"][0]["dst"], "::/0");
    }

    #[test]
    fn dns_from_config_is_passed_through() {
        let mut s = sample();
        s.dns = Some(json!({"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]}));
        assert_eq!(s.render(CniVersion::V1_1_0)["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn prev_result_gives_the_gateway_and_default_route() {
        let r = sample().render(CniVersion::V1_1_0);
        let ip = "10.250.0.7".parse().unwrap();
        assert_eq!(
            expected_from_prev(&r, ip),
            Ok(Expected {
                gateway: Some("10.250.0.1".parse().unwrap()),
                default_route: true
            })
        );
        let mut chained = r.clone();
        chained["routes"] = json!([{"dst": "10.0.0.0/8", "gw": "10.250.0.1"}]);
        assert!(!expected_from_prev(&chained, ip).unwrap().default_route);
        let e = expected_from_prev(&r, "10.250.0.8".parse().unwrap()).unwrap_err();
        assert!(e.contains("10.250.0.7/32") && e.contains("10.250.0.8"), "{e}");
        assert!(expected_from_prev(&json!({}), ip).is_err());
    }

    #[test]
    fn version_info_lists_all_versions() {
        assert_eq!(
            version_info(),
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }
}
