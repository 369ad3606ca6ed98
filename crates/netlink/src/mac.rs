//! MAC addresses as text: `02:00:0a:f4:00:05`, lower case, colon separated.

/// Formats a hardware address (any length; Ethernet is 6 bytes).
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
    fn format_and_parse_round_trip() {
        let m = [0x0a, 0x1b, 0x02, 0xff, 0x00, 0x09];
        assert_eq!(format_mac(&m), "0a:1b:02:ff:00:09");
        assert_eq!(parse_mac("0a:1b:02:ff:00:09"), Some(m));
        assert_eq!(parse_mac("0A:1B:02:FF:00:09"), Some(m));
        assert_eq!(format_mac(&[]), "");
    }

    #[test]
    fn parse_rejects_malformed() {
        for bad in ["", "0a:1b:02:ff:00", "0a:1b:02:ff:00:09:01", "0a:1b:02:ff:00:009", "0a:1b:02:ff:00:+9", "0a:1b:02:ff:00:zz", "0a-1b-02-ff-00-09"] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
