//! How `sinew observe` shows flows (table, compact, JSON lines) and parses
//! times: pure, shared by the CLI and its tests.

use sinew_proto::observer_v1 as pb;

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) to days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 in UTC with milliseconds: 2026-11-22T13:11:09.123Z.
pub fn rfc3339(unix_nanos: u64) -> String {
    let secs = (unix_nanos / 1_000_000_000) as i64;
    let ms = (unix_nanos / 1_000_000) % 1000;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The time in `tz` with milliseconds and the zone's offset, date and
/// time separated by `sep`: `2026-11-22 14:11:09.123+01:00`. The offset,
/// not an abbreviation, so that a time copied from a table is a valid
/// `--since`/`--until`.
pub fn local_time(unix_nanos: u64, tz: &jiff::tz::TimeZone, sep: char) -> String {
    let Ok(ts) = jiff::Timestamp::from_nanosecond(i128::from(unix_nanos)) else {
        return rfc3339(unix_nanos);
    };
    let t = tz.to_datetime(ts);
    let off = tz.to_offset(ts).seconds();
    let (sign, off) = if off < 0 { ('-', -off) } else { ('+', off) };
    format!(
        "{:04}-{:02}-{:02}{sep}{:02}:{:02}:{:02}.{:03}{sign}{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond(),
        off / 3600,
        off / 60 % 60
    )
}

/// The zone tables and compact lines are shown in: `TZ` if set, else the
/// system's local zone (like `date`); UTC if neither can be read.
pub fn local_zone() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC)
}

/// "90s", "5m", "1h30m", "500ms", "2d".
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0u128;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u128 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let nanos = match &rest[..unit_len] {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return None,
        };
        total += n * nanos;
        rest = &rest[unit_len..];
    }
    Some(std::time::Duration::from_nanos(u64::try_from(total).ok()?))
}

/// "2026-11-22T13:11:09Z", with optional fraction and a Z or ±HH:MM offset.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac_ns = 0u64;
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        if n == 0 {
            return None;
        }
        let digits = &r[..n.min(9)];
        frac_ns = digits.parse::<u64>().ok()? * 10u64.pow(9 - digits.len() as u32);
        rest = &r[n..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let hh: i64 = o[1..3].parse().ok()?;
            let mm: i64 = o[4..6].parse().ok()?;
            let v = hh * 3600 + mm * 60;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(i64::from(y), mo, d) * 86_400 + i64::from(h * 3600 + mi * 60 + sec) - offset_s;
    u64::try_from(secs).ok().map(|s| s * 1_000_000_000 + frac_ns)
}

/// `--since`: a duration back from `now` or an RFC 3339 time.
pub fn parse_since(s: &str, now_unix_nanos: u64) -> Result<u64, String> {
    if let Some(d) = parse_duration(s) {
        return Ok(now_unix_nanos.saturating_sub(d.as_nanos() as u64));
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!("{s:?} is neither a duration (30s, 5m, 1h30m) nor an RFC 3339 time (2026-11-22T13:00:00Z)")
    })
}

/// "SYN", "SYN|ACK", "" when none.
pub fn tcp_flags(f: Option<&pb::TcpFlags>) -> String {
    let Some(f) = f else { return String::new() };
    [
        (f.syn, "SYN"),
        (f.ack, "ACK"),
        (f.fin, "FIN"),
        (f.rst, "RST"),
        (f.psh, "PSH"),
        (f.urg, "URG"),
        (f.ece, "ECE"),
        (f.cwr, "CWR"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join("|")
}

/// How many characters of a container id name a pod (as `docker ps`).
const CONTAINER_ID_SHORT: usize = 12;

/// A pod as people name it: "ns/name", "name" without a namespace, and
/// for a pod the runtime gave no Kubernetes names (podman, cnitool) its
/// container id's first 12 characters; "-" when nothing names it.
pub fn pod(namespace: &str, name: &str, container_id: &str) -> String {
    match (namespace, name) {
        (_, "") if !container_id.is_empty() => {
            let short: String = container_id.chars().take(CONTAINER_ID_SHORT).collect();
            format!("container {short}")
        }
        (_, "") => "-".into(),
        ("", name) => name.into(),
        (ns, name) => format!("{ns}/{name}"),
    }
}

/// One side without its port: "ns/pod", else "ip (reserved)" or
/// "ip (container 0f1e2d3c4b5a)", else the address.
fn who(e: &pb::Endpoint) -> String {
    if !e.pod_name.is_empty() {
        pod(&e.namespace, &e.pod_name, "")
    } else if !e.reserved.is_empty() {
        format!("{} ({})", e.ip, e.reserved)
    } else if !e.container_id.is_empty() {
        format!("{} ({})", e.ip, pod("", "", &e.container_id))
    } else {
        e.ip.clone()
    }
}

/// "ns/pod:port" for pods, "ip:port" otherwise (with the reserved name).
pub fn endpoint(e: Option<&pb::Endpoint>) -> String {
    let Some(e) = e else { return "-".into() };
    let who = who(e);
    if e.port != 0 {
        format!("{who}:{}", e.port)
    } else {
        who
    }
}

pub fn verdict(f: &pb::Flow) -> &'static str {
    match f.verdict() {
        pb::Verdict::Forwarded => "FORWARDED",
        pb::Verdict::Dropped => "DROPPED",
        pb::Verdict::Unknown => "UNKNOWN",
    }
}

pub fn rule(r: &pb::PolicyRule) -> String {
    let ns = if r.namespace.is_empty() {
        String::new()
    } else {
        format!("{}/", r.namespace)
    };
    format!("{} {ns}{} {}[{}]", r.kind, r.name, r.section, r.index)
}

fn protocol(f: &pb::Flow) -> String {
    if let Some(l7) = &f.l7 {
        return l7.protocol.clone();
    }
    let flags = tcp_flags(f.tcp_flags.as_ref());
    if f.protocol == u32::from(crate::PROTO_ICMP) {
        format!("ICMP {}/{}", f.icmp_type, f.icmp_code)
    } else if flags.is_empty() {
        f.protocol_name.clone()
    } else {
        format!("{} {flags}", f.protocol_name)
    }
}

fn direction(f: &pb::Flow) -> &'static str {
    match f.direction() {
        pb::TrafficDirection::Ingress => "ingress",
        pb::TrafficDirection::Egress => "egress",
        pb::TrafficDirection::Unknown => "unknown",
    }
}

/// Why a packet no rule decided was denied: "default deny: a/web isolated
/// for ingress by NetworkPolicy a/web-in", or "no rule allows it" when the
/// isolating policies are not known (any more).
fn default_deny(f: &pb::Flow) -> String {
    if f.isolated_by.is_empty() {
        return "no rule allows it".into();
    }
    // The local pod: the destination of ingress, the source of egress.
    let local = match f.direction() {
        pb::TrafficDirection::Egress => f.source.as_ref(),
        _ => f.destination.as_ref(),
    };
    let policies: Vec<String> = f
        .isolated_by
        .iter()
        .map(|p| {
            if p.namespace.is_empty() {
                format!("{} {}", p.kind, p.name)
            } else {
                format!("{} {}/{}", p.kind, p.namespace, p.name)
            }
        })
        .collect();
    format!(
        "default deny: {} isolated for {} by {}",
        local.map(who).unwrap_or_else(|| "the pod".into()),
        direction(f),
        policies.join(", ")
    )
}

/// "1.2ms", "830us", "2.5s".
fn latency(micros: u64) -> String {
    match micros {
        0..=999 => format!("{micros}us"),
        1_000..=999_999 => format!("{:.1}ms", micros as f64 / 1000.0),
        _ => format!("{:.2}s", micros as f64 / 1_000_000.0),
    }
}

/// An L7 request: what was asked, what the client got, how long it took,
/// and the rule that allowed it or why it was refused:
/// "l7 INGRESS GET web.a/public/x 200 1.2ms by SinewNetworkPolicy a/web
/// ingress[0].toPorts[0]", "l7 INGRESS GET /admin 403 1.0ms DENIED
/// (no_rule_matched)".
fn l7_summary(f: &pb::Flow, l7: &pb::L7) -> String {
    let mut s = format!(
        "l7 {} {} {}{} {}",
        direction(f).to_ascii_uppercase(),
        if l7.method.is_empty() { "-" } else { &l7.method },
        l7.host,
        l7.path,
        l7.status
    );
    if l7.grpc_status != 0 {
        s.push_str(&format!(" grpc-status={}", l7.grpc_status));
    }
    s.push_str(&format!(" {}", latency(l7.latency_micros)));
    match l7.verdict() {
        pb::L7Verdict::Forwarded if !l7.rule.is_empty() => s.push_str(&format!(" by {}", l7.rule)),
        pb::L7Verdict::Forwarded => {}
        pb::L7Verdict::Denied => s.push_str(&format!(" DENIED ({})", l7.reason)),
        pb::L7Verdict::Error => s.push_str(&format!(" ERROR ({})", l7.reason)),
        pb::L7Verdict::Unknown => {}
    }
    s
}

/// What the last column says, each thing once. As in Hubble, a packet a
/// policy denies is two events: its policy verdict (the decision: match
/// kind, direction, ALLOWED or DENIED, and the rule or the isolating
/// policy) and its drop (the packet's fate and the reason). Traces say
/// where a forwarded packet went.
pub fn summary(f: &pb::Flow) -> String {
    let default_deny_drop = |r: &pb::DropReason| r.code == u32::from(sinew_abi::DropReason::Policy.code());
    if let Some(l7) = &f.l7 {
        return l7_summary(f, l7);
    }
    match f.r#type() {
        pb::EventType::PolicyVerdict => {
            let matched = match f.policy_match() {
                pb::PolicyMatch::None => "none",
                pb::PolicyMatch::L3Only => "L3-only",
                pb::PolicyMatch::L3L4 => "L3-L4",
                pb::PolicyMatch::L4Only => "L4-only",
                pb::PolicyMatch::All => "all",
            };
            let decided = match f.verdict() {
                pb::Verdict::Forwarded => "ALLOWED",
                pb::Verdict::Dropped => "DENIED",
                pb::Verdict::Unknown => "UNKNOWN",
            };
            let head = format!(
                "policy-verdict:{matched} {} {decided}",
                direction(f).to_ascii_uppercase()
            );
            match (&f.policy_rule, f.verdict()) {
                (Some(r), _) => format!("{head} by {}", rule(r)),
                (None, pb::Verdict::Dropped) => match &f.drop_reason {
                    Some(r) if !default_deny_drop(r) => format!("{head} ({})", r.description),
                    _ => format!("{head} ({})", default_deny(f)),
                },
                (None, _) => head,
            }
        }
        pb::EventType::Trace => {
            let to = match f.trace_observation_point() {
                pb::TraceObservationPoint::TraceToStack => "to-stack",
                pb::TraceObservationPoint::TraceToEndpoint => "to-endpoint",
                pb::TraceObservationPoint::TraceToTunnel => "to-tunnel",
                pb::TraceObservationPoint::TraceToProxy => "to-proxy",
                pb::TraceObservationPoint::TraceToNetwork => "to-network",
                pb::TraceObservationPoint::Unknown => "trace",
            };
            to.to_string()
        }
        _ => {
            let mut parts = Vec::new();
            match &f.drop_reason {
                Some(r) if default_deny_drop(r) && !f.isolated_by.is_empty() => {
                    parts.push(format!("policy denied ({})", default_deny(f)));
                }
                Some(r) => parts.push(r.description.clone()),
                None => {}
            }
            if let Some(r) = &f.policy_rule {
                parts.push(format!("by {}", rule(r)));
            }
            parts.join(", ")
        }
    }
}

/// The TIME column holds `2026-11-22 14:11:09.123+01:00`.
const TIME_WIDTH: usize = 29;

pub const TABLE_HEADER: &str = "TIME                          NODE      SOURCE                          DESTINATION                     PROTOCOL      VERDICT    SUMMARY";

/// One table row, its time in `tz` (see [`local_zone`]).
pub fn table_row(f: &pb::Flow, tz: &jiff::tz::TimeZone) -> String {
    format!(
        "{:<TIME_WIDTH$} {:<9} {:<31} {:<31} {:<13} {:<10} {}",
        local_time(f.time_unix_nanos, tz, ' '),
        f.node_name,
        endpoint(f.source.as_ref()),
        endpoint(f.destination.as_ref()),
        protocol(f),
        verdict(f),
        summary(f)
    )
}

/// One line per flow, its time (RFC 3339) in `tz`.
pub fn compact(f: &pb::Flow, tz: &jiff::tz::TimeZone) -> String {
    format!(
        "{} [{}] {} -> {} {} {} ({})",
        local_time(f.time_unix_nanos, tz, 'T'),
        f.node_name,
        endpoint(f.source.as_ref()),
        endpoint(f.destination.as_ref()),
        protocol(f),
        verdict(f),
        summary(f)
    )
}

fn endpoint_json(e: Option<&pb::Endpoint>) -> serde_json::Value {
    let Some(e) = e else { return serde_json::Value::Null };
    serde_json::json!({
        "ip": e.ip, "port": e.port, "namespace": e.namespace, "pod": e.pod_name,
        "labels": e.labels, "identity": e.identity, "node": e.node_name,
        "endpointID": e.endpoint_id, "reserved": e.reserved, "containerID": e.container_id,
    })
}

/// One flow as a JSON object (one line of `-o json`).
pub fn json(f: &pb::Flow) -> serde_json::Value {
    let flags = tcp_flags(f.tcp_flags.as_ref());
    serde_json::json!({
        "time": rfc3339(f.time_unix_nanos),
        "timeUnixNanos": f.time_unix_nanos,
        "node": f.node_name,
        "sequence": f.sequence,
        "verdict": verdict(f),
        "dropReason": f.drop_reason.as_ref().map(|r| serde_json::json!({"code": r.code, "name": r.name, "description": r.description})),
        "type": crate::event_type_name(f.r#type()),
        "traceObservationPoint": f.trace_observation_point().as_str_name(),
        "hook": f.hook().as_str_name(),
        "source": endpoint_json(f.source.as_ref()),
        "destination": endpoint_json(f.destination.as_ref()),
        "protocol": f.protocol_name,
        "tcpFlags": if flags.is_empty() { serde_json::Value::Null } else { flags.into() },
        "icmp": (f.protocol == 1).then(|| serde_json::json!({"type": f.icmp_type, "code": f.icmp_code})),
        "direction": f.direction().as_str_name(),
        "interface": f.interface,
        "ifindex": f.ifindex,
        "policyMatch": f.policy_match().as_str_name(),
        "policyRule": f.policy_rule.as_ref().map(|r| serde_json::json!({"kind": r.kind, "namespace": r.namespace, "name": r.name, "section": r.section, "index": r.index})),
        "packets": f.packets,
        "bytes": f.bytes,
        "length": f.length,
        "isReply": f.is_reply().as_str_name(),
        "isolatedBy": f.isolated_by.iter().map(|p| serde_json::json!({"kind": p.kind, "namespace": p.namespace, "name": p.name})).collect::<Vec<_>>(),
        "l7": f.l7.as_ref().map(|l| serde_json::json!({
            "protocol": l.protocol, "method": l.method, "host": l.host, "path": l.path,
            "status": l.status, "grpcStatus": l.grpc_status, "latencyMicros": l.latency_micros,
            "verdict": l.verdict().as_str_name(), "rule": l.rule, "reason": l.reason,
        })),
        "summary": summary(f),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_round_trip() {
        let t = 1_795_353_069_123_000_000; // 2026-11-22T13:11:09.123Z
        assert_eq!(rfc3339(t), "2026-11-22T13:11:09.123Z");
        assert_eq!(parse_rfc3339("2026-11-22T13:11:09.123Z"), Some(t));
        assert_eq!(parse_rfc3339("2026-11-22T14:11:09.123+01:00"), Some(t));
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Some(1_709_164_800_000_000_000));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    /// Tables show the date, the time and the zone's offset in the zone
    /// asked for (DST included), and what they show parses back as a time.
    #[test]
    fn local_time_has_date_and_zone() {
        use jiff::tz::{Offset, TimeZone};
        let t = 1_795_353_069_123_000_000; // 2026-11-22T13:11:09.123Z
        assert_eq!(local_time(t, &TimeZone::UTC, ' '), "2026-11-22 13:11:09.123+00:00");
        let india = TimeZone::posix("IST-5:30").unwrap();
        assert_eq!(local_time(t, &india, ' '), "2026-11-22 18:41:09.123+05:30");
        let west = TimeZone::fixed(Offset::constant(-3));
        assert_eq!(local_time(t, &west, 'T'), "2026-11-22T10:11:09.123-03:00");
        let paris = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        assert_eq!(local_time(t, &paris, ' '), "2026-11-22 14:11:09.123+01:00");
        let july = 1_783_595_469_000_000_000; // 2026-07-09T11:11:09Z
        assert_eq!(local_time(july, &paris, ' '), "2026-07-09 13:11:09.000+02:00");
        for tz in [&india, &west, &paris] {
            assert_eq!(parse_rfc3339(&local_time(t, tz, ' ')), Some(t));
        }
    }

    #[test]
    fn durations_and_since() {
        assert_eq!(parse_duration("1h30m"), Some(std::time::Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(std::time::Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_since("10s", 100_000_000_000), Ok(90_000_000_000));
        assert!(parse_since("later", 0).is_err());
    }

    #[test]
    fn rows_name_pods_flags_and_reasons() {
        let f = pb::Flow {
            time_unix_nanos: 1_795_353_069_123_000_000,
            node_name: "node1".into(),
            verdict: pb::Verdict::Dropped as i32,
            r#type: pb::EventType::Drop as i32,
            drop_reason: Some(pb::DropReason {
                code: 16,
                name: "policy_deny_rule".into(),
                description: "policy denied (deny rule)".into(),
            }),
            policy_rule: Some(pb::PolicyRule {
                kind: "SinewNetworkPolicy".into(),
                namespace: "a".into(),
                name: "deny-db".into(),
                section: "ingressDeny".into(),
                index: 0,
            }),
            source: Some(pb::Endpoint {
                ip: "10.0.0.5".into(),
                port: 4000,
                namespace: "a".into(),
                pod_name: "client".into(),
                ..Default::default()
            }),
            destination: Some(pb::Endpoint {
                ip: "198.18.0.1".into(),
                port: 80,
                reserved: "world".into(),
                ..Default::default()
            }),
            protocol: 6,
            protocol_name: "TCP".into(),
            tcp_flags: Some(pb::TcpFlags {
                syn: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = compact(&f, &jiff::tz::TimeZone::UTC);
        assert!(
            c.contains("a/client:4000 -> 198.18.0.1 (world):80 TCP SYN DROPPED"),
            "{c}"
        );
        assert!(
            c.contains("policy denied (deny rule), by SinewNetworkPolicy a/deny-db ingressDeny[0]"),
            "{c}"
        );
        let j = json(&f);
        assert_eq!(j["dropReason"]["name"], "policy_deny_rule");
        assert_eq!(j["source"]["pod"], "client");
        assert_eq!(j["tcpFlags"], "SYN");
        let tz = jiff::tz::TimeZone::fixed(jiff::tz::Offset::constant(1));
        let row = table_row(&f, &tz);
        assert!(row.starts_with("2026-11-22 14:11:09.123+01:00 node1"), "{row}");
        assert_eq!(row.find("node1"), TABLE_HEADER.find("NODE"), "{row}");
        assert_eq!(row.find("a/client"), TABLE_HEADER.find("SOURCE"), "{row}");
        assert!(compact(&f, &tz).starts_with("2026-11-22T14:11:09.123+01:00 [node1]"));
    }

    #[test]
    fn l7_rows_show_the_request_status_latency_and_rule_or_reason() {
        let pod = |ns: &str, name: &str, port| pb::Endpoint {
            ip: "10.0.1.5".into(),
            port,
            namespace: ns.into(),
            pod_name: name.into(),
            ..Default::default()
        };
        let mut f = pb::Flow {
            node_name: "node2".into(),
            verdict: pb::Verdict::Forwarded as i32,
            r#type: pb::EventType::L7 as i32,
            direction: pb::TrafficDirection::Ingress as i32,
            source: Some(pod("default", "client", 41000)),
            destination: Some(pod("default", "web", 80)),
            protocol: 6,
            protocol_name: "TCP".into(),
            l7: Some(pb::L7 {
                protocol: "HTTP/1.1".into(),
                method: "GET".into(),
                host: "web".into(),
                path: "/public/a".into(),
                status: 200,
                latency_micros: 1234,
                verdict: pb::L7Verdict::Forwarded as i32,
                rule: "SinewNetworkPolicy default/web ingress[0].toPorts[0]".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = compact(&f, &jiff::tz::TimeZone::UTC);
        assert!(
            c.contains("default/client:41000 -> default/web:80 HTTP/1.1 FORWARDED (l7 INGRESS GET web/public/a 200 1.2ms by SinewNetworkPolicy default/web ingress[0].toPorts[0])"),
            "{c}"
        );
        let l7 = f.l7.as_mut().unwrap();
        l7.path = "/admin".into();
        l7.status = 403;
        l7.latency_micros = 800;
        l7.verdict = pb::L7Verdict::Denied as i32;
        l7.rule.clear();
        l7.reason = "no_rule_matched".into();
        f.verdict = pb::Verdict::Dropped as i32;
        assert!(
            summary(&f).ends_with("GET web/admin 403 800us DENIED (no_rule_matched)"),
            "{}",
            summary(&f)
        );
        let j = json(&f);
        assert_eq!(j["type"], "l7");
        assert_eq!(j["l7"]["status"], 403);
        assert_eq!(j["l7"]["verdict"], "L7_VERDICT_DENIED");
    }

    /// Pods without Kubernetes names are named by their container id.
    #[test]
    fn unnamed_pods_show_their_container() {
        assert_eq!(pod("a", "web", "c0ffee"), "a/web");
        assert_eq!(pod("", "web", ""), "web");
        assert_eq!(pod("", "", "0123456789abcdef0123"), "container 0123456789ab");
        assert_eq!(pod("", "", ""), "-");
        let e = pb::Endpoint {
            ip: "10.0.1.9".into(),
            port: 80,
            container_id: "0123456789abcdef0123".into(),
            endpoint_id: 9,
            ..Default::default()
        };
        assert_eq!(endpoint(Some(&e)), "10.0.1.9 (container 0123456789ab):80");
    }
}
