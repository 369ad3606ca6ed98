//! The agent's half of the L7 redirect: which policy map values carry a
//! proxy port, and the routing that delivers a redirected packet on this
//! node.
//!
//! The datapath hands a connection that an L7 rule covers to the proxy's
//! transparent listener with `bpf_sk_assign` and marks it
//! [`sinew_abi::MARK_TO_PROXY`]; the packet keeps its original destination,
//! so only an `ip rule fwmark ... lookup` [`sinew_abi::PROXY_ROUTE_TABLE`]
//! with a local default route in that table makes the node accept it
//! ([`install_routing`], at start). The listener for ingress rules and the
//! one for egress rules are the `--proxy-ports` flag ([`ProxyPorts`]).
//! [`set_proxy_ports`] writes those ports into an endpoint's compiled
//! policy values for the entries that sinew-policy says need the proxy.

use std::collections::{BTreeMap, BTreeSet};

use sinew_abi::{
    PolicyKey, PolicyValue, MARK_TO_PROXY, POLICY_ACTION_ALLOW, POLICY_ANY_IDENTITY, POLICY_PREFIX_EXACT,
    POLICY_PREFIX_PROTO, PROXY_EGRESS_PORT_DEFAULT, PROXY_INGRESS_PORT_DEFAULT, PROXY_ROUTE_TABLE,
};
use sinew_policy::{Direction, Entry, Proto, Resolved};

use crate::netutil::{self, NetError};

/// Priority of the to-proxy rule: after the local table (0), before main.
pub const RULE_PRIORITY: u32 = 2004;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("--proxy-ports {value:?}: {reason}; give the ingress and the egress listener, e.g. --proxy-ports {PROXY_INGRESS_PORT_DEFAULT},{PROXY_EGRESS_PORT_DEFAULT}")]
    Ports { value: String, reason: &'static str },
    #[error("cannot install the routing of L7-redirected packets (ip rule fwmark {MARK_TO_PROXY:#x} lookup {PROXY_ROUTE_TABLE}): {source}; the agent needs CAP_NET_ADMIN")]
    Routing {
        #[source]
        source: NetError,
    },
}

/// The proxy's transparent listeners on this node (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyPorts {
    /// For ingress rules, on the destination's node.
    pub ingress: u16,
    /// For egress rules, on the source's node.
    pub egress: u16,
}

impl Default for ProxyPorts {
    fn default() -> Self {
        Self {
            ingress: PROXY_INGRESS_PORT_DEFAULT,
            egress: PROXY_EGRESS_PORT_DEFAULT,
        }
    }
}

impl ProxyPorts {
    /// The listener for rules of `direction`.
    pub fn for_direction(self, direction: Direction) -> u16 {
        match direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        }
    }
}

impl std::str::FromStr for ProxyPorts {
    type Err = RedirectError;

    /// `INGRESS,EGRESS`, e.g. `15006,15001`.
    fn from_str(s: &str) -> Result<Self, RedirectError> {
        let err = |reason| RedirectError::Ports {
            value: s.to_string(),
            reason,
        };
        let (i, e) = s.split_once(',').ok_or_else(|| err("two ports are needed"))?;
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| err("a port is 1-65535"));
        let (ingress, egress) = (port(i)?, port(e)?);
        if ingress == 0 || egress == 0 {
            return Err(err("a port is 1-65535"));
        }
        if ingress == egress {
            return Err(err("the two listeners need different ports"));
        }
        Ok(Self { ingress, egress })
    }
}

/// What [`install_routing`] writes: the rule and the route, as `ip` args.
fn rule_args(verb: &str) -> Vec<String> {
    [
        "-4",
        "rule",
        verb,
        "fwmark",
        &format!("{MARK_TO_PROXY:#x}"),
        "lookup",
        &PROXY_ROUTE_TABLE.to_string(),
        "pref",
        &RULE_PRIORITY.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn route_args() -> Vec<String> {
    [
        "-4",
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &PROXY_ROUTE_TABLE.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Whether `ip -4 rule show` output holds the to-proxy rule.
fn has_rule(rules: &str) -> bool {
    let mark = format!("fwmark {MARK_TO_PROXY:#x}");
    let table = format!("lookup {PROXY_ROUTE_TABLE}");
    rules
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("{RULE_PRIORITY}:")) && l.contains(&mark) && l.contains(&table))
}

/// Installs (or keeps) the routing that delivers a packet the datapath
/// assigned to the proxy on this node: table [`PROXY_ROUTE_TABLE`] with a
/// local default route, and the rule sending [`MARK_TO_PROXY`] there.
/// Idempotent; run at every start, in the node's network namespace.
pub fn install_routing() -> Result<(), RedirectError> {
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        netutil::ip(&args).map_err(|source| RedirectError::Routing { source })
    };
    run(route_args())?;
    let rules = netutil::ip_output(&["-4", "rule", "show"]).map_err(|source| RedirectError::Routing { source })?;
    if !has_rule(&rules) {
        run(rule_args("add"))?;
    }
    Ok(())
}

/// The ports of key `k` as an inclusive range (any protocol: all ports).
fn port_range(k: &PolicyKey) -> (u32, u32) {
    if k.prefixlen <= POLICY_PREFIX_PROTO {
        return (0, 0xffff);
    }
    let bits = (k.prefixlen - POLICY_PREFIX_PROTO).min(16);
    let lo = u32::from(u16::from_be(k.dport)) & !(0xffffu32 >> bits) & 0xffff;
    (lo, lo | (0xffffu32 >> bits))
}

/// Whether `open` lets every connection of `k` in without the proxy: an
/// allow for the same direction, for the same peer or any peer, for the
/// same protocol or any, whose ports hold all of `k`'s.
fn opens(open: &PolicyKey, k: &PolicyKey) -> bool {
    if open.ep_id != k.ep_id || open.direction != k.direction {
        return false;
    }
    if open.identity != k.identity && open.identity != POLICY_ANY_IDENTITY {
        return false;
    }
    if open.prefixlen <= POLICY_PREFIX_EXACT {
        return true;
    }
    if open.proto != k.proto {
        return false;
    }
    let (olo, ohi) = port_range(open);
    let (lo, hi) = port_range(k);
    olo <= lo && hi <= ohi
}

/// Writes proxy ports into endpoint `ep_id`'s compiled policy values
/// (`crate::policy::compile`'s output): every map key of an entry in
/// `redirects` gets the listener of its direction, if it is a TCP allow and
/// no other allow of the endpoint lets the same peer reach the same ports
/// without the proxy (then the port is open to that peer, and redirecting
/// it would apply L7 rules to connections no L7 rule covers). A key the
/// compile turned into a deny stays a deny. Returns the keys given a port.
///
/// `redirects` are the entries that sinew-policy marks as needing the
/// proxy (every allowing rule for that peer and port has L7 rules).
pub fn set_proxy_ports(
    ep_id: u32,
    compiled: &mut BTreeMap<PolicyKey, PolicyValue>,
    redirects: &[Entry],
    ports: ProxyPorts,
) -> BTreeSet<PolicyKey> {
    // The keys of each redirected entry, as the compile makes them.
    let mut scratch = crate::policy::compile::RuleTable::default();
    let mut wanted: BTreeMap<PolicyKey, u16> = BTreeMap::new();
    for e in redirects {
        if e.proto != Some(Proto::Tcp) {
            continue;
        }
        let one = Resolved {
            entries: vec![e.clone()],
            ..Resolved::default()
        };
        for k in crate::policy::compile::compile(ep_id, &one, &mut scratch).into_keys() {
            wanted.insert(k, ports.for_direction(e.direction));
        }
    }
    let open: Vec<PolicyKey> = compiled
        .iter()
        .filter(|(k, v)| v.action == POLICY_ACTION_ALLOW && !wanted.contains_key(k))
        .map(|(k, _)| *k)
        .collect();
    let mut set = BTreeSet::new();
    for (k, port) in wanted {
        let Some(v) = compiled.get_mut(&k) else { continue };
        if v.action != POLICY_ACTION_ALLOW || open.iter().any(|o| opens(o, &k)) {
            continue;
        }
        v.proxy_port = port;
        set.insert(k);
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_policy::{Action, Peer};

    fn entry(direction: Direction, peer: Peer, ports: Option<(u16, u16)>, action: Action) -> Entry {
        Entry {
            direction,
            peer,
            proto: Some(Proto::Tcp),
            ports,
            action,
            rules: vec![],
            l7: vec![],
        }
    }

    fn compile(entries: &[Entry]) -> BTreeMap<PolicyKey, PolicyValue> {
        let r = Resolved {
            entries: entries.to_vec(),
            ..Resolved::default()
        };
        crate::policy::compile::compile(7, &r, &mut crate::policy::compile::RuleTable::default())
    }

    fn ports_of(m: &BTreeMap<PolicyKey, PolicyValue>) -> Vec<(u32, u16, u16)> {
        m.iter()
            .map(|(k, v)| (k.identity, u16::from_be(k.dport), v.proxy_port))
            .collect()
    }

    #[test]
    fn proxy_ports_parse_and_refuse_with_the_flag_and_an_example() {
        assert_eq!(
            "15006,15001".parse::<ProxyPorts>().unwrap(),
            ProxyPorts {
                ingress: 15006,
                egress: 15001
            }
        );
        assert_eq!(ProxyPorts::default(), "15006,15001".parse().unwrap());
        for bad in ["15006", "15006,15006", "0,1", "a,b", "70000,1"] {
            let e = bad.parse::<ProxyPorts>().unwrap_err().to_string();
            assert!(e.contains("--proxy-ports") && e.contains("15006,15001"), "{bad}: {e}");
        }
    }

    #[test]
    fn redirected_entries_get_their_directions_listener_and_nothing_else_does() {
        let l7_in = entry(Direction::Ingress, Peer::Identity(300), Some((80, 80)), Action::Allow);
        let l7_out = entry(Direction::Egress, Peer::Any, Some((8080, 8081)), Action::Allow);
        let plain = entry(Direction::Ingress, Peer::Identity(300), Some((81, 81)), Action::Allow);
        let mut m = compile(&[l7_in.clone(), l7_out.clone(), plain]);
        let ports = ProxyPorts::default();
        let set = set_proxy_ports(7, &mut m, &[l7_in, l7_out], ports);
        assert_eq!(set.len(), 2, "port 80, and 8080-8081 as one /15 block: {set:?}");
        let got = ports_of(&m);
        assert!(got.contains(&(300, 80, 15006)), "{got:?}");
        assert!(got.contains(&(300, 81, 0)), "{got:?}");
        assert!(got.contains(&(POLICY_ANY_IDENTITY, 8080, 15001)), "{got:?}");
    }

    #[test]
    fn a_port_open_to_the_peer_without_l7_is_not_redirected() {
        // Any peer may reach port 80 without L7 rules: 300's L7 rule on
        // the same port must not send 300 to the proxy.
        let l7 = entry(Direction::Ingress, Peer::Identity(300), Some((80, 80)), Action::Allow);
        let open_any = entry(Direction::Ingress, Peer::Any, Some((0, 1023)), Action::Allow);
        let mut m = compile(&[l7.clone(), open_any]);
        assert!(set_proxy_ports(7, &mut m, std::slice::from_ref(&l7), ProxyPorts::default()).is_empty());
        // Open on another port only: redirected.
        let other = entry(Direction::Ingress, Peer::Any, Some((81, 81)), Action::Allow);
        let mut m = compile(&[l7.clone(), other]);
        assert_eq!(set_proxy_ports(7, &mut m, &[l7], ProxyPorts::default()).len(), 1);
    }

    #[test]
    fn denies_and_other_protocols_never_carry_a_port() {
        let l7 = entry(Direction::Ingress, Peer::Identity(300), Some((80, 80)), Action::Allow);
        let deny = entry(Direction::Ingress, Peer::Identity(300), Some((0, 1023)), Action::Deny);
        let mut m = compile(&[l7.clone(), deny]);
        assert!(set_proxy_ports(7, &mut m, &[l7], ProxyPorts::default()).is_empty());
        assert!(m.values().all(|v| v.proxy_port == 0));
        let udp = Entry {
            proto: Some(Proto::Udp),
            ..entry(Direction::Ingress, Peer::Identity(300), Some((53, 53)), Action::Allow)
        };
        let mut m = compile(std::slice::from_ref(&udp));
        assert!(set_proxy_ports(7, &mut m, &[udp], ProxyPorts::default()).is_empty());
    }

    #[test]
    fn port_ranges_of_lpm_keys() {
        let k = |prefixlen, port: u16| PolicyKey {
            prefixlen,
            dport: port.to_be(),
            ..PolicyKey::default()
        };
        assert_eq!(port_range(&k(POLICY_PREFIX_PROTO + 16, 80)), (80, 80));
        assert_eq!(port_range(&k(POLICY_PREFIX_PROTO + 15, 8080)), (8080, 8081));
        assert_eq!(port_range(&k(POLICY_PREFIX_PROTO + 6, 0)), (0, 1023));
        assert_eq!(port_range(&k(POLICY_PREFIX_PROTO, 0)), (0, 0xffff));
    }

    #[test]
    fn the_rule_is_found_in_ip_rule_output() {
        let shown = format!(
            "0:\tfrom all lookup local\n{RULE_PRIORITY}:\tfrom all fwmark {MARK_TO_PROXY:#x} lookup {PROXY_ROUTE_TABLE}\n32766:\tfrom all lookup main\n"
        );
        assert!(has_rule(&shown));
        assert!(!has_rule("0:\tfrom all lookup local\n32766:\tfrom all lookup main\n"));
        assert_eq!(rule_args("add")[4], format!("{MARK_TO_PROXY:#x}"));
    }
}
