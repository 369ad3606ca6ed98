//! The compiled matcher: the rule sets of one (endpoint, direction, port),
//! each with the peers it applies to, indexed so that the cost of a
//! request hardly grows with the number of rules.
//!
//! Paths are indexed three ways: exact paths in a hash map, prefixes in a
//! byte trie (one walk down the request path finds every prefix rule that
//! applies), regexes that start with a literal (`/api/v[0-9]+/x`) in a
//! second trie keyed by that literal, so that only those whose literal the
//! path starts with are run, and the other regexes in one `RegexSet` (one
//! pass finds every regex that
//! matches). Only the rules found there (and the rules without a path) have
//! their method, host, headers and peers checked. When several rules
//! match, the verdict names the first in rule order (set, then http before
//! grpc, then index), exactly what a scan in order would name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use crate::rules::{anchored, build_regex, HeaderValue, L7Rules, RuleError, StringMatch, REGEX_SIZE_LIMIT};

/// A peer a rule set applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Peer {
    /// Every peer.
    Any,
    /// The peer with this security identity.
    Identity(u32),
    /// Every peer whose address has this CIDR class (`sinew_policy::cidr_class`).
    CidrClass(u32),
}

/// Who sent (ingress) or receives (egress) the request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerId {
    pub identity: u32,
    /// The CIDR class of the peer's address, when it has one.
    pub cidr_class: Option<u32>,
}

impl PeerId {
    pub fn identity(identity: u32) -> Self {
        PeerId {
            identity,
            cidr_class: None,
        }
    }
}

/// The L7 rules of one policy rule, with the peers they apply to.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSet {
    /// Empty: no peer (the set never matches).
    pub peers: Vec<Peer>,
    pub rules: L7Rules,
    /// The policy rule these came from, as people read it
    /// (`SinewNetworkPolicy default/web ingress[0].toPorts[0]`).
    pub rule: String,
}

/// Request headers, looked up by lower-case name.
pub trait Headers {
    /// Calls `f` with each value of the header `name` until it returns
    /// true, and returns whether it did.
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

impl Headers for http::HeaderMap {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.get_all(name).iter().any(|v| f(v.as_bytes()))
    }
}

fn list_any_value<K: AsRef<str>, V: AsRef<[u8]>>(
    list: &[(K, V)],
    name: &str,
    f: &mut dyn FnMut(&[u8]) -> bool,
) -> bool {
    list.iter()
        .filter(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
        .any(|(_, v)| f(v.as_ref()))
}

/// A list of (name, value) pairs, as `sinew policy trace` takes them.
impl<K: AsRef<str>, V: AsRef<[u8]>> Headers for Vec<(K, V)> {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        list_any_value(self, name, f)
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>, const N: usize> Headers for [(K, V); N] {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        list_any_value(self, name, f)
    }
}

impl<K: AsRef<str>, V: AsRef<[u8]>> Headers for &[(K, V)] {
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        list_any_value(self, name, f)
    }
}

/// What a rule is matched against.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The normalised path ([`crate::normalize_target`]), without query.
    pub path: &'a str,
    /// `:authority` or `Host`, as received (port and case are dealt with
    /// here).
    pub host: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleKind {
    Http,
    Grpc,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Http => "http",
            RuleKind::Grpc => "grpc",
        }
    }
}

/// The rule that allowed a request: `rules.{kind}[index]` of rule set
/// `set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Match {
    pub set: usize,
    pub kind: RuleKind,
    pub index: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allowed(Match),
    /// No rule of a set that applies to the peer matched.
    Denied,
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        matches!(self, Verdict::Allowed(_))
    }
}

/// Rules that did not compile: the set (by index and reference) and each
/// error, with its field path relative to `rules`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{rule}: {}", errors.iter().map(|e| format!("rules.{e}")).collect::<Vec<_>>().join("; "))]
pub struct CompileError {
    pub set: usize,
    pub rule: String,
    pub errors: Vec<RuleError>,
}

#[derive(Clone, Debug)]
enum Str {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

impl Str {
    fn new(m: &StringMatch, lower: bool) -> Result<Str, regex::Error> {
        let fold = |s: &str| if lower { s.to_ascii_lowercase() } else { s.to_string() };
        Ok(match m {
            StringMatch::Exact(v) => Str::Exact(fold(v)),
            StringMatch::Prefix(v) => Str::Prefix(fold(v)),
            StringMatch::Regex(v) => Str::Regex(build_regex(v)?),
        })
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Str::Exact(v) => v == s,
            Str::Prefix(v) => s.starts_with(v.as_str()),
            Str::Regex(re) => re.is_match(s),
        }
    }
}

#[derive(Clone, Debug)]
enum Hdr {
    Present,
    Absent,
    Exact(Vec<u8>),
    Regex(regex::bytes::Regex),
}

/// One rule with everything but its path.
#[derive(Clone, Debug)]
struct Compiled {
    set: u32,
    kind: RuleKind,
    index: u32,
    /// The path regex of a rule indexed by its literal prefix.
    path_re: Option<regex::Regex>,
    method: Option<Str>,
    host: Option<Str>,
    headers: Vec<(String, Hdr)>,
}

/// A byte trie of path prefixes; each node lists the rules whose prefix
/// ends there.
#[derive(Clone, Debug, Default)]
struct Trie {
    nodes: Vec<TrieNode>,
}

#[derive(Clone, Debug, Default)]
struct TrieNode {
    ids: Vec<u32>,
    /// Sorted by byte.
    children: Vec<(u8, u32)>,
}

impl Trie {
    fn insert(&mut self, key: &[u8], id: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut at = 0usize;
        for &b in key {
            at = match self.nodes[at].children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.nodes[at].children[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[at].children.insert(i, (b, next as u32));
                    next
                }
            };
        }
        self.nodes[at].ids.push(id);
    }

    /// Calls `f` with the rules of every prefix of `key`, shortest first.
    fn walk(&self, key: &[u8], mut f: impl FnMut(&[u32])) {
        let Some(mut node) = self.nodes.first() else { return };
        f(&node.ids);
        for &b in key {
            match node.children.binary_search_by_key(&b, |c| c.0) {
                Ok(i) => node = &self.nodes[node.children[i].1 as usize],
                Err(_) => return,
            }
            if !node.ids.is_empty() {
                f(&node.ids);
            }
        }
    }
}

/// The rule sets of one port, compiled. Cheap to share (`Arc`) between
/// the proxy's connections; immutable once built.
#[derive(Clone, Debug, Default)]
pub struct CompiledRules {
    sets: Vec<RuleSet>,
    /// Per set: applies to every peer, else its sorted identities and
    /// CIDR classes.
    set_any: Vec<bool>,
    set_ids: Vec<Vec<u32>>,
    set_classes: Vec<Vec<u32>>,
    /// In rule order; a rule's number is its position.
    rules: Vec<Compiled>,
    no_path: Vec<u32>,
    exact: HashMap<String, Vec<u32>>,
    prefix: Trie,
    regex: Option<regex::RegexSet>,
    regex_ids: Vec<u32>,
    /// Path regexes by their literal prefix.
    regex_prefix: Trie,
}

impl CompiledRules {
    /// Compiles `sets` (each validated first). The first set with an
    /// error is reported.
    pub fn new(sets: Vec<RuleSet>) -> Result<Self, CompileError> {
        let mut c = CompiledRules::default();
        let mut regexes: Vec<String> = Vec::new();
        for (si, set) in sets.iter().enumerate() {
            let fail = |errors: Vec<RuleError>| CompileError {
                set: si,
                rule: set.rule.clone(),
                errors,
            };
            let errors = set.rules.validate();
            if !errors.is_empty() {
                return Err(fail(errors));
            }
            let mut any = false;
            let (mut ids, mut classes) = (Vec::new(), Vec::new());
            for p in &set.peers {
                match p {
                    Peer::Any => any = true,
                    Peer::Identity(id) => ids.push(*id),
                    Peer::CidrClass(class) => classes.push(*class),
                }
            }
            ids.sort_unstable();
            ids.dedup();
            classes.sort_unstable();
            classes.dedup();
            c.set_any.push(any);
            c.set_ids.push(ids);
            c.set_classes.push(classes);

            let grpc = set.rules.grpc.iter().map(|g| {
                (
                    RuleKind::Grpc,
                    Some(StringMatch::Exact("POST".into())),
                    Some(g.path()),
                    None,
                    Vec::new(),
                )
            });
            let http = set.rules.http.iter().map(|h| {
                (
                    RuleKind::Http,
                    h.method.clone(),
                    h.path.clone(),
                    h.host.clone(),
                    h.headers.clone(),
                )
            });
            let mut counters = [0u32; 2];
            for (kind, method, path, host, headers) in http.chain(grpc) {
                let counter = &mut counters[kind as usize];
                let index = *counter;
                *counter += 1;
                let re_err = |field: &str, e: regex::Error| {
                    fail(vec![RuleError {
                        path: format!("{}[{index}].{field}", kind.as_str()),
                        value: String::new(),
                        reason: e.to_string(),
                    }])
                };
                let id = c.rules.len() as u32;
                let method = method
                    .as_ref()
                    .map(|m| Str::new(m, false))
                    .transpose()
                    .map_err(|e| re_err("method", e))?;
                let host = host
                    .as_ref()
                    .map(|m| Str::new(m, true))
                    .transpose()
                    .map_err(|e| re_err("host", e))?;
                let mut hdrs = Vec::new();
                for (j, h) in headers.iter().enumerate() {
                    let v = match &h.value {
                        HeaderValue::Present => Hdr::Present,
                        HeaderValue::Absent => Hdr::Absent,
                        HeaderValue::Exact(v) => Hdr::Exact(v.as_bytes().to_vec()),
                        HeaderValue::Regex(re) => Hdr::Regex(
                            regex::bytes::RegexBuilder::new(&anchored(re))
                                .size_limit(REGEX_SIZE_LIMIT)
                                .build()
                                .map_err(|e| re_err(&format!("headers[{j}]"), e))?,
                        ),
                    };
                    hdrs.push((h.name.to_ascii_lowercase(), v));
                }
                let mut path_re = None;
                match path {
                    None => c.no_path.push(id),
                    Some(StringMatch::Exact(p)) => c.exact.entry(p).or_default().push(id),
                    Some(StringMatch::Prefix(p)) => c.prefix.insert(p.as_bytes(), id),
                    Some(StringMatch::Regex(re)) => match literal_prefix(&re) {
                        Some(lit) => {
                            path_re = Some(build_regex(&re).map_err(|e| re_err("path", e))?);
                            c.regex_prefix.insert(lit.as_bytes(), id);
                        }
                        None => {
                            regexes.push(anchored(&re));
                            c.regex_ids.push(id);
                        }
                    },
                }
                c.rules.push(Compiled {
                    set: si as u32,
                    kind,
                    index,
                    path_re,
                    method,
                    host,
                    headers: hdrs,
                });
            }
        }
        if !regexes.is_empty() {
            let set = regex::RegexSetBuilder::new(&regexes)
                .size_limit(REGEX_SIZE_LIMIT.saturating_mul(regexes.len()).min(256 << 20))
                .build()
                .map_err(|e| CompileError {
                    set: 0,
                    rule: "every path regex of the port together".into(),
                    errors: vec![RuleError {
                        path: String::new(),
                        value: String::new(),
                        reason: format!("{e}; use fewer or simpler path regexes"),
                    }],
                })?;
            c.regex = Some(set);
        }
        c.sets = sets;
        Ok(c)
    }

    pub fn sets(&self) -> &[RuleSet] {
        &self.sets
    }

    /// The number of HTTP and gRPC rules in all sets.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Names the rule of a match: the set's `rule` and the field path,
    /// `SinewNetworkPolicy default/web ingress[0].toPorts[0].rules.http[1]`.
    pub fn describe(&self, m: Match) -> String {
        let rule = self.sets.get(m.set).map(|s| s.rule.as_str()).unwrap_or("?");
        format!("{rule}.rules.{}[{}]", m.kind.as_str(), m.index)
    }

    fn peer_ok(&self, set: usize, peer: PeerId) -> bool {
        self.set_any[set]
            || self.set_ids[set].binary_search(&peer.identity).is_ok()
            || peer
                .cidr_class
                .is_some_and(|c| self.set_classes[set].binary_search(&c).is_ok())
    }

    fn rule_ok(&self, id: u32, peer: PeerId, req: &Request<'_>, host: Option<&str>) -> bool {
        let r = &self.rules[id as usize];
        self.peer_ok(r.set as usize, peer)
            && r.method.as_ref().is_none_or(|m| m.matches(req.method))
            && r.host.as_ref().is_none_or(|m| host.is_some_and(|h| m.matches(h)))
            && r.headers.iter().all(|(name, want)| match want {
                Hdr::Present => req.headers.any_value(name, &mut |_| true),
                Hdr::Absent => !req.headers.any_value(name, &mut |_| true),
                Hdr::Exact(v) => req.headers.any_value(name, &mut |got| got == v.as_slice()),
                Hdr::Regex(re) => req.headers.any_value(name, &mut |got| re.is_match(got)),
            })
    }

    /// The verdict for `req` from `peer`: allowed by the first rule (in
    /// rule order) of a set that applies to the peer, else denied.
    pub fn check(&self, peer: PeerId, req: &Request<'_>) -> Verdict {
        let host = req.host.map(host_key);
        let host = host.as_deref();
        let mut best = u32::MAX;
        // Each list is in rule order: its first passing rule is its best.
        let scan = |ids: &[u32], best: &mut u32| {
            for &id in ids {
                if id >= *best {
                    return;
                }
                if self.rule_ok(id, peer, req, host) {
                    *best = id;
                    return;
                }
            }
        };
        scan(&self.no_path, &mut best);
        if let Some(ids) = self.exact.get(req.path) {
            scan(ids, &mut best);
        }
        self.prefix.walk(req.path.as_bytes(), |ids| scan(ids, &mut best));
        self.regex_prefix.walk(req.path.as_bytes(), |ids| {
            for &id in ids {
                if id >= best {
                    return;
                }
                let re = self.rules[id as usize].path_re.as_ref();
                if re.is_some_and(|re| re.is_match(req.path)) && self.rule_ok(id, peer, req, host) {
                    best = id;
                    return;
                }
            }
        });
        if let Some(set) = &self.regex {
            if best > self.regex_ids.first().copied().unwrap_or(u32::MAX) {
                for i in set.matches(req.path).iter() {
                    scan(&self.regex_ids[i..=i], &mut best);
                }
            }
        }
        match self.rules.get(best as usize) {
            Some(r) => Verdict::Allowed(Match {
                set: r.set as usize,
                kind: r.kind,
                index: r.index as usize,
            }),
            None => Verdict::Denied,
        }
    }
}

/// The literal every match of `re` starts with, when there is a useful one:
/// the characters before the first that has a meaning in the syntax, minus
/// the last when a quantifier follows it. `None` when the regex has an
/// alternation anywhere (`a|b` need not start with `a`) or no literal.
fn literal_prefix(re: &str) -> Option<String> {
    if re.contains('|') {
        return None;
    }
    let mut lit: Vec<char> = Vec::new();
    let mut chars = re.chars().peekable();
    while let Some(&c) = chars.peek() {
        if "\\.+*?()[]{}^$# \t\n\r".contains(c) {
            break;
        }
        lit.push(c);
        chars.next();
    }
    if matches!(chars.peek(), Some('?' | '*' | '{')) {
        lit.pop();
    }
    (!lit.is_empty()).then(|| lit.into_iter().collect())
}

/// The host as rules see it: lower-case, without port or trailing dot.
pub(crate) fn host_key(host: &str) -> Cow<'_, str> {
    let h = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal keeps its brackets.
        match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::reference_check;
    use crate::rules::{GrpcRule, HeaderMatch, HttpRule};

    fn set(peers: Vec<Peer>, yaml: &str, rule: &str) -> RuleSet {
        RuleSet {
            peers,
            rules: serde_yaml::from_str(yaml).unwrap(),
            rule: rule.into(),
        }
    }

    fn req<'a>(method: &'a str, path: &'a str, headers: &'a dyn Headers) -> Request<'a> {
        Request {
            method,
            path,
            host: Some("API.example.com:8080"),
            headers,
        }
    }

    const NOH: &[(&str, &str); 0] = &[];

    #[test]
    fn whitelist_by_method_path_host_and_headers() {
        let c = CompiledRules::new(vec![set(
            vec![Peer::Any],
            r#"
http:
- {method: GET, path: {prefix: /public/}}
- {method: {regex: "PUT|PATCH"}, path: /items, host: api.example.com}
- {path: {regex: "/v[0-9]+/status"}, headers: [{name: X-Env, exact: prod}]}
- {path: /secret, headers: [{name: x-debug, present: false}]}
"#,
            "P",
        )])
        .unwrap();
        let p = PeerId::identity(7);
        let at = |index| {
            Verdict::Allowed(Match {
                set: 0,
                kind: RuleKind::Http,
                index,
            })
        };
        assert_eq!(c.check(p, &req("GET", "/public/a", NOH)), at(0));
        assert_eq!(c.check(p, &req("POST", "/public/a", NOH)), Verdict::Denied);
        assert_eq!(c.check(p, &req("GET", "/admin", NOH)), Verdict::Denied);
        assert_eq!(
            c.check(p, &req("PATCH", "/items", NOH)),
            at(1),
            "host compared without port, lowercase"
        );
        assert_eq!(c.check(p, &req("DELETE", "/items", NOH)), Verdict::Denied);
        assert_eq!(c.check(p, &req("GET", "/v12/status", &[("x-env", "prod")])), at(2));
        assert_eq!(
            c.check(p, &req("GET", "/v12/status", &[("x-env", "dev")])),
            Verdict::Denied
        );
        assert_eq!(
            c.check(p, &req("GET", "/v12/status/x", &[("x-env", "prod")])),
            Verdict::Denied,
            "anchored"
        );
        assert_eq!(c.check(p, &req("GET", "/secret", NOH)), at(3));
        assert_eq!(c.check(p, &req("GET", "/secret", &[("X-Debug", "1")])), Verdict::Denied);
        assert_eq!(
            c.describe(Match {
                set: 0,
                kind: RuleKind::Http,
                index: 2
            }),
            "P.rules.http[2]"
        );
    }

    #[test]
    fn grpc_rules_match_service_and_method() {
        let c = CompiledRules::new(vec![set(
            vec![Peer::Identity(5)],
            "grpc: [{service: pkg.Greeter, method: SayHello}, {service: pkg.Admin}]",
            "G",
        )])
        .unwrap();
        let p = PeerId::identity(5);
        let grpc = |index| {
            Verdict::Allowed(Match {
                set: 0,
                kind: RuleKind::Grpc,
                index,
            })
        };
        assert_eq!(c.check(p, &req("POST", "/pkg.Greeter/SayHello", NOH)), grpc(0));
        assert_eq!(c.check(p, &req("POST", "/pkg.Greeter/SayBye", NOH)), Verdict::Denied);
        assert_eq!(c.check(p, &req("POST", "/pkg.Admin/Anything", NOH)), grpc(1));
        assert_eq!(c.check(p, &req("POST", "/pkg.AdminX/Anything", NOH)), Verdict::Denied);
        assert_eq!(
            c.check(p, &req("GET", "/pkg.Greeter/SayHello", NOH)),
            Verdict::Denied,
            "gRPC is POST"
        );
        assert_eq!(
            c.check(PeerId::identity(6), &req("POST", "/pkg.Greeter/SayHello", NOH)),
            Verdict::Denied
        );
    }

    #[test]
    fn peers_select_rule_sets_and_the_first_rule_is_named() {
        let c = CompiledRules::new(vec![
            set(
                vec![Peer::Identity(1), Peer::CidrClass(900)],
                "http: [{path: {prefix: /a}}]",
                "A",
            ),
            set(vec![Peer::Any], "http: [{path: /a/b}, {method: GET}]", "B"),
        ])
        .unwrap();
        let m = |set, index| {
            Verdict::Allowed(Match {
                set,
                kind: RuleKind::Http,
                index,
            })
        };
        assert_eq!(c.check(PeerId::identity(1), &req("POST", "/a/b", NOH)), m(0, 0));
        assert_eq!(c.check(PeerId::identity(2), &req("POST", "/a/b", NOH)), m(1, 0));
        assert_eq!(c.check(PeerId::identity(2), &req("POST", "/a/c", NOH)), Verdict::Denied);
        assert_eq!(c.check(PeerId::identity(2), &req("GET", "/a/c", NOH)), m(1, 1));
        let by_class = PeerId {
            identity: 2,
            cidr_class: Some(900),
        };
        assert_eq!(c.check(by_class, &req("POST", "/a/c", NOH)), m(0, 0));
        // A set without peers applies to nobody.
        let none = CompiledRules::new(vec![set(vec![], "http: [{}]", "N")]).unwrap();
        assert_eq!(none.check(PeerId::identity(1), &req("GET", "/", NOH)), Verdict::Denied);
        assert_eq!(
            CompiledRules::default().check(PeerId::identity(1), &req("GET", "/", NOH)),
            Verdict::Denied
        );
    }

    #[test]
    fn invalid_rules_do_not_compile() {
        let e = CompiledRules::new(vec![
            set(vec![Peer::Any], "http: [{}]", "ok"),
            set(vec![Peer::Any], "http: [{path: {regex: '('}}]", "bad"),
        ])
        .unwrap_err();
        assert_eq!(e.set, 1);
        assert_eq!(e.errors[0].path, "http[0].path.regex");
        assert!(e.to_string().starts_with("bad: rules.http[0].path.regex"), "{e}");
    }

    #[test]
    fn http_header_map_is_a_header_source() {
        let mut h = http::HeaderMap::new();
        h.append("x-env", http::HeaderValue::from_static("dev"));
        h.append("x-env", http::HeaderValue::from_static("prod"));
        let c = CompiledRules::new(vec![set(
            vec![Peer::Any],
            "http: [{headers: [{name: X-ENV, exact: prod}]}]",
            "H",
        )])
        .unwrap();
        let r = Request {
            method: "GET",
            path: "/",
            host: None,
            headers: &h,
        };
        assert!(
            c.check(PeerId::default(), &r).is_allowed(),
            "any value of the header may match"
        );
    }

    #[test]
    fn regex_literal_prefixes() {
        assert_eq!(literal_prefix("/api/v[0-9]+/x").as_deref(), Some("/api/v"));
        assert_eq!(literal_prefix("/ab*").as_deref(), Some("/a"));
        assert_eq!(literal_prefix("/ab?c").as_deref(), Some("/a"));
        assert_eq!(literal_prefix("/ab{2}").as_deref(), Some("/a"));
        assert_eq!(literal_prefix("/pkg.Svc/.*").as_deref(), Some("/pkg"));
        assert_eq!(literal_prefix("/a|/b"), None);
        assert_eq!(literal_prefix("(?i)/a"), None);
        assert_eq!(literal_prefix("a*"), None);
        assert_eq!(literal_prefix(".*"), None);
        assert_eq!(literal_prefix("\\/a"), None);
    }

    #[test]
    fn hosts_lose_port_case_and_trailing_dot() {
        assert_eq!(host_key("API.Example.com:443"), "api.example.com");
        assert_eq!(host_key("api.example.com."), "api.example.com");
        assert_eq!(host_key("[::1]:80"), "[::1]");
        assert_eq!(host_key("[::1]"), "[::1]");
        assert_eq!(host_key("h"), "h");
    }

    /// The indexed matcher names the same rule as a scan in order, on
    /// many random rule lists and requests.
    #[test]
    fn indexed_matcher_agrees_with_a_scan_in_order() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let paths = [
            "/", "/a", "/a/", "/a/b", "/ab", "/b/c", "/a/b/c", "/pkg.S/M", "/pkg.S/N",
        ];
        let methods = ["GET", "POST", "PUT"];
        for _ in 0..400 {
            let mut sets = Vec::new();
            for s in 0..1 + rnd(3) {
                let mut rules = L7Rules::default();
                for _ in 0..1 + rnd(6) {
                    let p = paths[rnd(paths.len() as u64) as usize].to_string();
                    let path = match rnd(4) {
                        0 => None,
                        1 => Some(StringMatch::Exact(p)),
                        2 => Some(StringMatch::Prefix(p)),
                        // With a literal prefix (the regex trie) or without
                        // (the RegexSet).
                        3 if rnd(2) == 0 => Some(StringMatch::Regex(format!("{p}.*"))),
                        _ => Some(StringMatch::Regex(format!("(?:{p})/?.*"))),
                    };
                    let method = match rnd(3) {
                        0 => None,
                        _ => Some(StringMatch::Exact(methods[rnd(3) as usize].into())),
                    };
                    let headers = match rnd(4) {
                        0 => vec![HeaderMatch {
                            name: "x".into(),
                            value: HeaderValue::Exact("1".into()),
                        }],
                        _ => vec![],
                    };
                    rules.http.push(HttpRule {
                        method,
                        path,
                        host: None,
                        headers,
                    });
                }
                if rnd(2) == 0 {
                    rules.grpc.push(GrpcRule {
                        service: "pkg.S".into(),
                        method: (rnd(2) == 0).then(|| "M".into()),
                    });
                }
                let peers = match rnd(3) {
                    0 => vec![Peer::Any],
                    _ => vec![Peer::Identity(rnd(3) as u32)],
                };
                sets.push(RuleSet {
                    peers,
                    rules,
                    rule: format!("r{s}"),
                });
            }
            let c = CompiledRules::new(sets.clone()).unwrap();
            for _ in 0..20 {
                let path = paths[rnd(paths.len() as u64) as usize];
                let method = methods[rnd(3) as usize];
                let headers: Vec<(&str, &str)> = if rnd(2) == 0 { vec![("x", "1")] } else { vec![] };
                let r = Request {
                    method,
                    path,
                    host: None,
                    headers: &headers,
                };
                let peer = PeerId::identity(rnd(3) as u32);
                assert_eq!(
                    c.check(peer, &r),
                    reference_check(&sets, peer, &r),
                    "{sets:#?} {r:?} {peer:?}"
                );
            }
        }
    }
}
