//! The proxy's view of L7 rules: compiles a snapshot's rule sets into
//! matchers and judges one request. Pure: no I/O.
//!
//! Interim matcher until sinew-l7 lands; it follows the contract in the
//! design notes (full-match regexes, a missing field matches everything).

use http::HeaderMap;
use regex::Regex;
use sinew_proto::proxy_v1 as pb;

/// What a rule sees of a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Normalised, without the query.
    pub path: &'a str,
    /// Port stripped, lower case; empty when the request named none.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// The request is gRPC (content-type application/grpc*).
    pub grpc: bool,
}

#[derive(Debug)]
enum StrMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl StrMatch {
    fn compile(m: Option<&pb::StringMatch>, field: &str) -> Result<Self, String> {
        use pb::string_match::Kind;
        Ok(match m.and_then(|m| m.kind.as_ref()) {
            None => StrMatch::Any,
            Some(Kind::Exact(s)) => StrMatch::Exact(s.clone()),
            Some(Kind::Prefix(s)) => StrMatch::Prefix(s.clone()),
            Some(Kind::Regex(r)) => StrMatch::Regex(full_regex(r, field)?),
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Any => true,
            StrMatch::Exact(s) => s == v,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

fn full_regex(r: &str, field: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("{field}.regex: {e}"))
}

#[derive(Debug)]
enum HeaderCheck {
    Present(bool),
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
struct HttpMatcher {
    method: StrMatch,
    path: StrMatch,
    host: StrMatch,
    headers: Vec<(http::HeaderName, HeaderCheck)>,
}

/// One rule set's requests, compiled.
#[derive(Debug, Default)]
pub struct CompiledRules {
    http: Vec<HttpMatcher>,
    grpc: Vec<(String, Option<String>)>,
}

impl CompiledRules {
    pub fn compile(http: &[pb::HttpRule], grpc: &[pb::GrpcRule]) -> Result<Self, String> {
        let mut out = CompiledRules::default();
        for (i, r) in http.iter().enumerate() {
            let f = format!("http[{i}]");
            let mut headers = Vec::new();
            for (j, h) in r.headers.iter().enumerate() {
                let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                    .map_err(|e| format!("{f}.headers[{j}].name: {e}"))?;
                use pb::header_match::Kind;
                let check = match &h.kind {
                    None => HeaderCheck::Present(true),
                    Some(Kind::Present(p)) => HeaderCheck::Present(*p),
                    Some(Kind::Exact(s)) => HeaderCheck::Exact(s.clone()),
                    Some(Kind::Regex(r)) => HeaderCheck::Regex(full_regex(r, &format!("{f}.headers[{j}]"))?),
                };
                headers.push((name, check));
            }
            out.http.push(HttpMatcher {
                method: StrMatch::compile(r.method.as_ref(), &format!("{f}.method"))?,
                path: StrMatch::compile(r.path.as_ref(), &format!("{f}.path"))?,
                host: StrMatch::compile(r.host.as_ref(), &format!("{f}.host"))?,
                headers,
            });
        }
        for (i, g) in grpc.iter().enumerate() {
            if g.service.is_empty() {
                return Err(format!("grpc[{i}].service: empty"));
            }
            let m = (!g.method.is_empty()).then(|| g.method.clone());
            out.grpc.push((g.service.clone(), m));
        }
        Ok(out)
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if self.http.iter().any(|m| http_matches(m, req)) {
            return true;
        }
        if req.grpc && req.method == "POST" {
            if let Some((svc, method)) = grpc_parts(req.path) {
                return self
                    .grpc
                    .iter()
                    .any(|(s, m)| s == svc && m.as_deref().is_none_or(|m| m == method));
            }
        }
        false
    }
}

fn http_matches(m: &HttpMatcher, req: &RequestView<'_>) -> bool {
    m.method.matches(req.method)
        && m.path.matches(req.path)
        && m.host.matches(req.host)
        && m.headers.iter().all(|(name, check)| {
            let mut values = req.headers.get_all(name).iter();
            match check {
                HeaderCheck::Present(p) => values.next().is_some() == *p,
                HeaderCheck::Exact(s) => values.any(|v| v.as_bytes() == s.as_bytes()),
                HeaderCheck::Regex(r) => values.any(|v| v.to_str().is_ok_and(|v| r.is_match(v))),
            }
        })
}

/// `/pkg.Service/Method` -> (`pkg.Service`, `Method`).
fn grpc_parts(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (svc, method) = rest.split_once('/')?;
    if svc.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some((svc, method))
}

/// Why a path was refused instead of normalised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path does not start with /")]
    NotAbsolute,
    #[error("encoded slash, backslash or NUL in path")]
    EncodedSeparator,
    #[error("raw control character or backslash in path")]
    RawControl,
    #[error("malformed percent-encoding in path")]
    BadPercent,
}

/// Normalises a request path once: percent-decodes unreserved characters,
/// upper-cases the remaining escapes, removes dot segments (RFC 3986
/// 5.2.4). The result is what the rules judge and what the upstream gets.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let b = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c < 0x20 || c == 0x7f || c == b'\\' {
            return Err(PathError::RawControl);
        }
        if c == b'%' {
            let hex = |x: u8| (x as char).to_digit(16);
            let (Some(h), Some(l)) = (b.get(i + 1).and_then(|x| hex(*x)), b.get(i + 2).and_then(|x| hex(*x))) else {
                return Err(PathError::BadPercent);
            };
            let v = (h * 16 + l) as u8;
            if v == b'/' || v == b'\\' || v == 0 {
                return Err(PathError::EncodedSeparator);
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{v:02X}"));
            }
            i += 3;
            continue;
        }
        decoded.push(c as char);
        i += 1;
    }
    Ok(remove_dot_segments(&decoded))
}

fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path[1..].split('/').collect();
    let last = segs.len() - 1;
    let mut trailing = false;
    for (i, s) in segs.iter().enumerate() {
        match *s {
            "." => trailing = i == last,
            ".." => {
                out.pop();
                trailing = i == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut r = String::with_capacity(path.len());
    for s in &out {
        r.push('/');
        r.push_str(s);
    }
    if trailing || r.is_empty() {
        r.push('/');
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalise_once_and_ambiguous_forms_are_refused() {
        assert_eq!(normalize_path("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize_path("/../../x").unwrap(), "/x");
        assert_eq!(normalize_path("/%61dmin").unwrap(), "/admin");
        assert_eq!(normalize_path("/a%2e%2e/").unwrap(), "/a../");
        assert_eq!(normalize_path("/x/%2E%2E/admin").unwrap(), "/admin");
        assert_eq!(normalize_path("/a%3fb").unwrap(), "/a%3Fb");
        assert_eq!(normalize_path("/").unwrap(), "/");
        assert_eq!(normalize_path("/public/").unwrap(), "/public/");
        assert_eq!(normalize_path("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/a%5cb"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/a%00"), Err(PathError::EncodedSeparator));
        assert_eq!(normalize_path("/a\\b"), Err(PathError::RawControl));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadPercent));
        assert_eq!(normalize_path("a"), Err(PathError::NotAbsolute));
    }
}
