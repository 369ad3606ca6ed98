//! Fuzz entry points, plain functions so that a `fuzz/` crate (cargo-fuzz)
//! and the unit tests call the same code. Each takes arbitrary bytes and
//! panics only when an invariant breaks.

use crate::matcher::{CompiledRules, Peer, PeerId, Request, RuleKind, RuleSet, Verdict};
use crate::path::{normalize_path, normalize_target};
use crate::rules::{GrpcRule, HeaderMatch, HeaderValue, HttpRule, L7Rules, StringMatch};
use crate::Match;

/// The rule parser: YAML text to rules, validation, compilation. Rules
/// that validate must compile, and compiled rules must answer a request.
pub fn rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(rules) = serde_yaml::from_str::<L7Rules>(text) else {
        return;
    };
    let valid = rules.validate().is_empty();
    let set = RuleSet {
        peers: vec![Peer::Any],
        rules,
        rule: "fuzz".into(),
    };
    match CompiledRules::new(vec![set]) {
        Ok(c) => {
            assert!(valid, "rules that fail validation compiled");
            let r = Request {
                method: "GET",
                path: "/",
                host: Some("h"),
                headers: &[("x", "y")],
            };
            let _ = c.check(PeerId::default(), &r);
        }
        // A RegexSet of valid regexes can still be too big together.
        Err(e) => assert!(!valid || e.errors.iter().all(|e| e.path.is_empty()), "{e}"),
    }
}

/// The target normaliser: whatever it accepts is in normal form (no dot
/// segment, no `//`, no ambiguous escape) and normalising it again
/// changes nothing.
pub fn path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(p) = normalize_path(text) {
        check_normal(&p);
    }
    if let Ok(t) = normalize_target(text) {
        if t.path != "*" {
            check_normal(&t.path);
        }
        let again = normalize_target(&t.origin_form()).expect("a normalised target is accepted again");
        assert_eq!(again.path, t.path);
        assert_eq!(again.query, t.query);
    }
}

fn check_normal(p: &str) {
    assert!(p.starts_with('/'), "{p:?}");
    assert!(!p.contains("//"), "{p:?}");
    for seg in p.split('/') {
        assert!(seg != "." && seg != "..", "{p:?}");
    }
    let upper = p.to_ascii_uppercase();
    for bad in ["%2F", "%5C", "%00", "\\"] {
        assert!(!upper.contains(bad), "{p:?}");
    }
    assert_eq!(normalize_path(p).as_deref(), Ok(p), "not a fixed point");
}

/// The matcher: rules and requests drawn from the bytes, checked against
/// [`reference_check`], a scan in rule order.
pub fn matcher(data: &[u8]) {
    let mut u = Bytes(data);
    let mut sets = Vec::new();
    for s in 0..1 + u.pick(3) {
        let mut rules = L7Rules::default();
        for _ in 0..u.pick(8) {
            rules.http.push(HttpRule {
                method: u.opt_match(&["GET", "POST", "PUT"], false),
                path: u.opt_match(&["/", "/a", "/a/", "/a/b", "/b", "/pkg.S/M"], true),
                host: u.opt_match(&["h", "h.example", "x"], false),
                headers: if u.pick(3) == 0 {
                    vec![HeaderMatch {
                        name: "x-h".into(),
                        value: match u.pick(4) {
                            0 => HeaderValue::Present,
                            1 => HeaderValue::Absent,
                            2 => HeaderValue::Exact("v".into()),
                            _ => HeaderValue::Regex("v.*".into()),
                        },
                    }]
                } else {
                    vec![]
                },
            });
        }
        for _ in 0..u.pick(3) {
            rules.grpc.push(GrpcRule {
                service: ["pkg.S", "pkg.T"][u.pick(2)].into(),
                method: [None, Some("M".to_string()), Some("N".to_string())][u.pick(3)].clone(),
            });
        }
        let peers = match u.pick(3) {
            0 => vec![Peer::Any],
            1 => vec![Peer::Identity(u.pick(3) as u32)],
            _ => vec![Peer::CidrClass(u.pick(2) as u32 + 100)],
        };
        sets.push(RuleSet {
            peers,
            rules,
            rule: format!("set{s}"),
        });
    }
    let Ok(c) = CompiledRules::new(sets.clone()) else {
        // Only an empty rule list is invalid here.
        assert!(sets.iter().any(|s| s.rules.is_empty()));
        return;
    };
    while !u.0.is_empty() {
        let paths = [
            "/", "/a", "/a/", "/a/b", "/a/bc", "/b", "/pkg.S/M", "/pkg.S/N", "/pkg.T/M",
        ];
        let path = paths[u.pick(paths.len())];
        let method = ["GET", "POST", "PUT", "DELETE"][u.pick(4)];
        let host = [None, Some("H:80"), Some("h.example."), Some("x")][u.pick(4)];
        let headers: Vec<(&str, &str)> = [vec![], vec![("x-h", "v")], vec![("X-H", "w")]][u.pick(3)].clone();
        let peer = PeerId {
            identity: u.pick(3) as u32,
            cidr_class: [None, Some(100), Some(101)][u.pick(3)],
        };
        let r = Request {
            method,
            path,
            host,
            headers: &headers,
        };
        assert_eq!(c.check(peer, &r), reference_check(&sets, peer, &r), "{r:?} {peer:?}");
    }
}

/// The verdict by definition: the first rule, in rule order, of a set that
/// applies to the peer and whose every field matches. Slow; for tests.
pub fn reference_check(sets: &[RuleSet], peer: PeerId, req: &Request<'_>) -> Verdict {
    let host = req.host.map(crate::matcher::host_key);
    let str_ok = |m: &Option<StringMatch>, v: Option<&str>| match (m, v) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(StringMatch::Exact(e)), Some(v)) => e == v,
        (Some(StringMatch::Prefix(p)), Some(v)) => v.starts_with(p.as_str()),
        (Some(StringMatch::Regex(re)), Some(v)) => crate::rules::build_regex(re).is_ok_and(|re| re.is_match(v)),
    };
    for (si, set) in sets.iter().enumerate() {
        let applies = set.peers.iter().any(|p| match p {
            Peer::Any => true,
            Peer::Identity(id) => *id == peer.identity,
            Peer::CidrClass(c) => peer.cidr_class == Some(*c),
        });
        if !applies {
            continue;
        }
        for (i, h) in set.rules.http.iter().enumerate() {
            let headers_ok = h.headers.iter().all(|hm| {
                let name = hm.name.to_ascii_lowercase();
                let mut values = Vec::new();
                req.headers.any_value(&name, &mut |v| {
                    values.push(v.to_vec());
                    false
                });
                match &hm.value {
                    HeaderValue::Present => !values.is_empty(),
                    HeaderValue::Absent => values.is_empty(),
                    HeaderValue::Exact(e) => values.iter().any(|v| v == e.as_bytes()),
                    HeaderValue::Regex(re) => {
                        let re = regex::bytes::Regex::new(&crate::rules::anchored(re)).unwrap();
                        values.iter().any(|v| re.is_match(v))
                    }
                }
            });
            if str_ok(&h.method, Some(req.method))
                && str_ok(&h.path, Some(req.path))
                && str_ok(&h.host, host.as_deref())
                && headers_ok
            {
                return Verdict::Allowed(Match {
                    set: si,
                    kind: RuleKind::Http,
                    index: i,
                });
            }
        }
        for (i, g) in set.rules.grpc.iter().enumerate() {
            if req.method == "POST" && str_ok(&Some(g.path()), Some(req.path)) {
                return Verdict::Allowed(Match {
                    set: si,
                    kind: RuleKind::Grpc,
                    index: i,
                });
            }
        }
    }
    Verdict::Denied
}

/// Draws small choices from fuzz bytes; zero once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn pick(&mut self, n: usize) -> usize {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                usize::from(*b) % n.max(1)
            }
            None => 0,
        }
    }

    fn opt_match(&mut self, values: &[&str], path: bool) -> Option<StringMatch> {
        let v = values[self.pick(values.len())].to_string();
        match self.pick(5) {
            0 => None,
            1 => Some(StringMatch::Exact(v)),
            // Method and host prefixes must stay valid: a prefix of a value.
            2 if path => Some(StringMatch::Prefix(v)),
            2 => Some(StringMatch::Prefix(v[..1].to_string())),
            // With a literal prefix (indexed by it) or without (RegexSet).
            3 => Some(StringMatch::Regex(format!("{}.*", regex::escape(&v)))),
            _ => Some(StringMatch::Regex(format!("(?:{}).*", regex::escape(&v)))),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The entry points survive a spread of inputs (the fuzz crate runs
    /// them for real; this keeps them compiling and sane).
    #[test]
    fn entry_points_hold_on_sample_inputs() {
        let mut seed = 0x9e37_79b9u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in 0..300 {
            let data: Vec<u8> = (0..len % 64).map(|_| (next() & 0xff) as u8).collect();
            super::matcher(&data);
            super::path(&data);
            super::rules(&data);
        }
        let alphabet = b"/./%2e%2F..;ab\\?#";
        for _ in 0..2000 {
            let data: Vec<u8> = (0..next() % 24)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let mut with_slash = vec![b'/'];
            with_slash.extend(&data);
            super::path(&with_slash);
        }
        super::rules(b"http: [{method: GET, path: {prefix: /a}}]\ngrpc: [{service: a.B}]");
        super::rules(b"http: [{path: {regex: '(('}}]");
    }
}
