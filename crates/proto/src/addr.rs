//! Typed addresses on the wire: conversions between the protos' `IpAddr`,
//! `IpPrefix` and `MacAddr` messages and the standard types, and the one
//! MAC address text format of the project (`02:00:0a:f4:00:05`).
//!
//! The agent and the plugin exchange bytes, never text, so nothing is
//! formatted on one side to be parsed on the other.

use std::fmt;
use std::net::{self, Ipv4Addr, Ipv6Addr};

use crate::v1::{IpAddr, IpPrefix, MacAddr, ServiceBackend, ServiceFrontend};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("{field} is missing: the peer speaks an older sinew.agent.v1; run the same Sinew version for the agent and the CNI plugin")]
    Missing { field: &'static str },
    #[error("{field} has {len} bytes, not 4 or 16: the peer sent a malformed address")]
    IpLength { field: &'static str, len: usize },
    #[error("{field} has prefix length {len}, longer than the address: the peer sent a malformed prefix")]
    PrefixLength { field: &'static str, len: u32 },
    #[error("{field} has {len} bytes, not 6: the peer sent a malformed MAC address")]
    MacLength { field: &'static str, len: usize },
}

impl From<net::IpAddr> for IpAddr {
    fn from(ip: net::IpAddr) -> Self {
        let octets = match ip {
            net::IpAddr::V4(v) => v.octets().to_vec(),
            net::IpAddr::V6(v) => v.octets().to_vec(),
        };
        Self { octets }
    }
}

impl From<Ipv4Addr> for IpAddr {
    fn from(ip: Ipv4Addr) -> Self {
        net::IpAddr::V4(ip).into()
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(mac: [u8; 6]) -> Self {
        Self { octets: mac.to_vec() }
    }
}

impl IpAddr {
    /// The address; None when the length is neither 4 nor 16.
    pub fn to_std(&self) -> Option<net::IpAddr> {
        match self.octets.len() {
            4 => Some(net::IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&self.octets[..]).ok()?,
            ))),
            16 => Some(net::IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&self.octets[..]).ok()?,
            ))),
            _ => None,
        }
    }
}

impl MacAddr {
    /// The address; None when it is not 6 bytes.
    pub fn to_array(&self) -> Option<[u8; 6]> {
        <[u8; 6]>::try_from(&self.octets[..]).ok()
    }
}

impl IpPrefix {
    pub fn new(ip: net::IpAddr, len: u8) -> Self {
        Self {
            addr: Some(ip.into()),
            len: u32::from(len),
        }
    }
}

/// The address in field `field` (for the error), which must be present.
pub fn ip(field: &'static str, v: Option<&IpAddr>) -> Result<net::IpAddr, AddrError> {
    let v = v.ok_or(AddrError::Missing { field })?;
    v.to_std().ok_or(AddrError::IpLength {
        field,
        len: v.octets.len(),
    })
}

/// The address and prefix length in field `field`, which must be present
/// and no longer than the address.
pub fn prefix(field: &'static str, v: Option<&IpPrefix>) -> Result<(net::IpAddr, u8), AddrError> {
    let v = v.ok_or(AddrError::Missing { field })?;
    let addr = ip(field, v.addr.as_ref())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if v.len > max {
        return Err(AddrError::PrefixLength { field, len: v.len });
    }
    Ok((addr, v.len as u8))
}

/// The MAC address in field `field`, which must be present.
pub fn mac(field: &'static str, v: Option<&MacAddr>) -> Result<[u8; 6], AddrError> {
    let v = v.ok_or(AddrError::Missing { field })?;
    v.to_array().ok_or(AddrError::MacLength {
        field,
        len: v.octets.len(),
    })
}

/// Text for people (CLI tables, JSON, logs): the address, empty when
/// absent, and the raw bytes in hex when malformed.
pub fn text<T: fmt::Display>(v: Option<&T>) -> String {
    v.map(ToString::to_string).unwrap_or_default()
}

impl fmt::Display for IpAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_std() {
            Some(ip) => ip.fmt(f),
            None => write!(f, "<invalid address {}>", format_mac(&self.octets)),
        }
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", text(self.addr.as_ref()), self.len)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_mac(&self.octets))
    }
}

/// `address:port/protocol`, as `sinew service list` names a frontend.
impl fmt::Display for ServiceFrontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", text(self.address.as_ref()), self.port, self.protocol)
    }
}

/// `address:port`, as `sinew service list` names a backend.
impl fmt::Display for ServiceBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", text(self.address.as_ref()), self.port)
    }
}

/// Formats a hardware address (any length; Ethernet is 6 bytes) as lower
/// case hex bytes separated by colons.
pub fn format_mac(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 3);
    for (i, x) in b.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Parses a six-byte Ethernet address written as [`format_mac`] writes it
/// (upper case and one-digit bytes accepted too).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_round_trips_both_families_and_rejects_bad_lengths() {
        for s in ["10.0.0.7", "fd00::7"] {
            let std: net::IpAddr = s.parse().unwrap();
            let p = IpAddr::from(std);
            assert_eq!(ip("ip", Some(&p)), Ok(std));
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(ip("ip", None), Err(AddrError::Missing { field: "ip" }));
        let bad = IpAddr { octets: vec![1, 2, 3] };
        assert_eq!(ip("ip", Some(&bad)), Err(AddrError::IpLength { field: "ip", len: 3 }));
        assert_eq!(bad.to_string(), "<invalid address 01:02:03>");
        assert!(AddrError::Missing { field: "ip" }
            .to_string()
            .contains("same Sinew version"));
    }

    #[test]
    fn service_addresses_read_as_before_they_were_typed() {
        let b = ServiceBackend {
            address: Some(net::Ipv4Addr::new(10, 244, 1, 5).into()),
            port: 8080,
            ..Default::default()
        };
        let f = ServiceFrontend {
            address: Some(net::Ipv4Addr::new(10, 96, 0, 10).into()),
            port: 80,
            protocol: "TCP".into(),
            backends: vec![b.clone()],
            ..Default::default()
        };
        assert_eq!(f.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(b.to_string(), "10.244.1.5:8080");
        assert_eq!(
            ServiceBackend::default().to_string(),
            ":0",
            "absent: empty, as the string was"
        );
    }

    #[test]
    fn prefix_checks_the_length_against_the_family() {
        let p = IpPrefix::new("10.0.0.7".parse().unwrap(), 32);
        assert_eq!(prefix("address", Some(&p)), Ok(("10.0.0.7".parse().unwrap(), 32)));
        assert_eq!(p.to_string(), "10.0.0.7/32");
        let long = IpPrefix { len: 33, ..p.clone() };
        assert!(matches!(
            prefix("address", Some(&long)),
            Err(AddrError::PrefixLength { .. })
        ));
        let v6 = IpPrefix::new("fd00::7".parse().unwrap(), 128);
        assert_eq!(prefix("address", Some(&v6)).unwrap().1, 128);
        let empty = IpPrefix { addr: None, len: 0 };
        assert_eq!(
            prefix("address", Some(&empty)),
            Err(AddrError::Missing { field: "address" })
        );
    }

    #[test]
    fn mac_round_trips_and_formats() {
        let m = [0x0a, 0x1b, 0x02, 0xff, 0x00, 0x09];
        let p = MacAddr::from(m);
        assert_eq!(mac("pod_mac", Some(&p)), Ok(m));
        assert_eq!(p.to_string(), "0a:1b:02:ff:00:09");
        assert_eq!(text(Some(&p)), "0a:1b:02:ff:00:09");
        assert_eq!(text::<MacAddr>(None), "");
        let short = MacAddr { octets: vec![1; 5] };
        assert_eq!(
            mac("pod_mac", Some(&short)),
            Err(AddrError::MacLength {
                field: "pod_mac",
                len: 5
            })
        );
    }

    #[test]
    fn mac_text_format_and_parse() {
        let m = [0x0a, 0x1b, 0x02, 0xff, 0x00, 0x09];
        assert_eq!(format_mac(&m), "0a:1b:02:ff:00:09");
        assert_eq!(parse_mac("0a:1b:02:ff:00:09"), Some(m));
        assert_eq!(parse_mac("0A:1B:2:FF:00:09"), Some(m));
        assert_eq!(format_mac(&[]), "");
        for bad in [
            "",
            "0a:1b:02:ff:00",
            "0a:1b:02:ff:00:09:01",
            "0a:1b:02:ff:00:009",
            "0a:1b:02:ff:00:+9",
            "0a:1b:02:ff:00:zz",
            "0a-1b-02-ff-00-09",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
