//! The proxy's side of sinew-l7: turns a snapshot's rule sets (proto) into
//! sinew-l7 rule sets, compiles them, and judges one request. Pure: no I/O.
//! The matcher and the path normalisation are sinew-l7's, the same code
//! `sinew policy trace` uses.

use std::sync::Arc;

use sinew_l7 as l7;
use sinew_proto::proxy_v1 as pb;

pub use l7::{PathError, PeerId};

/// What a rule sees of a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Normalised, without the query.
    pub path: &'a str,
    /// As received (`:authority` or Host); empty when the request named none.
    pub host: &'a str,
    pub headers: &'a dyn l7::Headers,
    /// The request is gRPC (content-type application/grpc*).
    pub grpc: bool,
}

/// The rule sets of one endpoint, direction and port, compiled.
#[derive(Debug)]
pub struct CompiledRules {
    inner: l7::CompiledRules,
    /// The name of every rule (`describe`), made once per snapshot rather
    /// than formatted per request: `[set] -> (http names, grpc names)`.
    names: Vec<SetNames>,
}

/// The names of one rule set's HTTP and gRPC rules, by index.
type SetNames = (Vec<Arc<str>>, Vec<Arc<str>>);

fn string_match(m: Option<&pb::StringMatch>) -> Option<l7::StringMatch> {
    use pb::string_match::Kind;
    match m.and_then(|m| m.kind.as_ref())? {
        Kind::Exact(s) => Some(l7::StringMatch::Exact(s.clone())),
        Kind::Prefix(s) => Some(l7::StringMatch::Prefix(s.clone())),
        Kind::Regex(s) => Some(l7::StringMatch::Regex(s.clone())),
    }
}

fn rule_set(rs: &pb::RuleSet) -> l7::RuleSet {
    use pb::header_match::Kind;
    let http = rs
        .http
        .iter()
        .map(|r| l7::HttpRule {
            method: string_match(r.method.as_ref()),
            path: string_match(r.path.as_ref()),
            host: string_match(r.host.as_ref()),
            headers: r
                .headers
                .iter()
                .map(|h| l7::HeaderMatch {
                    name: h.name.clone(),
                    value: match &h.kind {
                        None | Some(Kind::Present(true)) => l7::HeaderValue::Present,
                        Some(Kind::Present(false)) => l7::HeaderValue::Absent,
                        Some(Kind::Exact(v)) => l7::HeaderValue::Exact(v.clone()),
                        Some(Kind::Regex(v)) => l7::HeaderValue::Regex(v.clone()),
                    },
                })
                .collect(),
        })
        .collect();
    let grpc = rs
        .grpc
        .iter()
        .map(|g| l7::GrpcRule {
            service: g.service.clone(),
            method: (!g.method.is_empty()).then(|| g.method.clone()),
        })
        .collect();
    let peers = if rs.peers.is_empty() && rs.cidr_classes.is_empty() {
        vec![l7::Peer::Any]
    } else {
        rs.peers
            .iter()
            .map(|p| l7::Peer::Identity(*p))
            .chain(rs.cidr_classes.iter().map(|c| l7::Peer::CidrClass(*c)))
            .collect()
    };
    l7::RuleSet {
        peers,
        rules: l7::L7Rules { http, grpc },
        rule: rs.rule.clone(),
    }
}

impl CompiledRules {
    pub fn compile(sets: &[pb::RuleSet]) -> Result<Self, String> {
        let inner = l7::CompiledRules::new(sets.iter().map(rule_set).collect()).map_err(|e| e.to_string())?;
        let name = |set: usize, kind: l7::RuleKind, index: usize| -> Arc<str> {
            inner.describe(l7::Match { set, kind, index }).into()
        };
        let names = sets
            .iter()
            .enumerate()
            .map(|(set, rs)| {
                (
                    (0..rs.http.len()).map(|i| name(set, l7::RuleKind::Http, i)).collect(),
                    (0..rs.grpc.len()).map(|i| name(set, l7::RuleKind::Grpc, i)).collect(),
                )
            })
            .collect();
        Ok(Self { inner, names })
    }

    /// The rule set (its policy rule) that allows the request, or `None`.
    pub fn judge(&self, peer: l7::PeerId, req: &RequestView<'_>) -> Option<Arc<str>> {
        let r = l7::Request {
            method: req.method,
            path: req.path,
            host: (!req.host.is_empty()).then_some(req.host),
            headers: req.headers,
        };
        match self.inner.check(peer, &r) {
            l7::Verdict::Allowed(m) => Some(self.name(m)),
            l7::Verdict::Denied => None,
        }
    }
}

impl CompiledRules {
    fn name(&self, m: l7::Match) -> Arc<str> {
        self.names
            .get(m.set)
            .and_then(|(http, grpc)| match m.kind {
                l7::RuleKind::Http => http.get(m.index),
                l7::RuleKind::Grpc => grpc.get(m.index),
            })
            .cloned()
            .unwrap_or_else(|| self.inner.describe(m).into())
    }
}

/// Normalises a request path once (sinew-l7): what the rules judge is what
/// the upstream gets.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    l7::normalize_path(raw)
}
