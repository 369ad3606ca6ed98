//! The L7 rule types of `toPorts[].rules`, as written in a policy, and
//! their validation.
//!
//! ```yaml
//! rules:
//!   http:
//!   - method: GET                       # string = exact; or {exact|prefix|regex: ...}
//!     path: {prefix: /public}
//!     host: api.example.com             # compared without port, lowercase
//!     headers:                          # all must match
//!     - {name: x-env, present: true}    # or exact: "prod" / regex: "^p" / present: false
//!   grpc:
//!   - {service: pkg.Greeter, method: SayHello}   # method left out = every method
//! ```
//!
//! A field left out matches everything; regexes match the whole value.
//! Deserialisation checks the shape (unknown fields, one matcher kind per
//! field); [`L7Rules::validate`] checks the values and names each error by
//! its field path, relative to `rules` (`http[1].path.regex`).

use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The request methods a rule may name exactly: RFC 9110 section 9.3 and
/// PATCH (RFC 5789). Methods are case-sensitive (RFC 9110 section 9.1).
pub const HTTP_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Largest compiled size of one regex, so that one rule cannot make the
/// proxy build an automaton of unbounded size.
pub(crate) const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// How one string field is matched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends: the regex must match the whole value.
    Regex(String),
}

impl StringMatch {
    /// The field name of the kind, as written (`exact`, `prefix`, `regex`).
    pub fn kind(&self) -> &'static str {
        match self {
            StringMatch::Exact(_) => "exact",
            StringMatch::Prefix(_) => "prefix",
            StringMatch::Regex(_) => "regex",
        }
    }

    pub fn value(&self) -> &str {
        match self {
            StringMatch::Exact(v) | StringMatch::Prefix(v) | StringMatch::Regex(v) => v,
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind(), self.value())
    }
}

impl Serialize for StringMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.kind(), self.value())?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringMatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string (exact match) or one of {exact: ..}, {prefix: ..}, {regex: ..}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringMatch, E> {
                Ok(StringMatch::Exact(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringMatch, A::Error> {
                let mut out: Option<StringMatch> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let m = match key.as_str() {
                        "exact" => StringMatch::Exact(value),
                        "prefix" => StringMatch::Prefix(value),
                        "regex" => StringMatch::Regex(value),
                        other => return Err(de::Error::unknown_field(other, &["exact", "prefix", "regex"])),
                    };
                    if let Some(prev) = &out {
                        return Err(de::Error::custom(format!(
                            "both `{}` and `{key}` given; write one of exact, prefix or regex",
                            prev.kind()
                        )));
                    }
                    out = Some(m);
                }
                out.ok_or_else(|| de::Error::custom("empty matcher; write one of exact, prefix or regex"))
            }
        }
        d.deserialize_any(V)
    }
}

/// What a header must be.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HeaderValue {
    /// `present: true`, or only a name.
    Present,
    /// `present: false`: the request must not carry the header.
    Absent,
    /// Some value of the header equals this.
    Exact(String),
    /// Some value of the header matches this whole.
    Regex(String),
}

/// One header condition. Names compare case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "HeaderRepr", into = "HeaderRepr")]
pub struct HeaderMatch {
    pub name: String,
    pub value: HeaderValue,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderRepr {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    present: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

impl TryFrom<HeaderRepr> for HeaderMatch {
    type Error = String;
    fn try_from(r: HeaderRepr) -> Result<Self, String> {
        let value = match (r.present, r.exact, r.regex) {
            (None | Some(true), None, None) => HeaderValue::Present,
            (Some(false), None, None) => HeaderValue::Absent,
            (None, Some(e), None) => HeaderValue::Exact(e),
            (None, None, Some(re)) => HeaderValue::Regex(re),
            _ => {
                return Err(format!(
                    "header {:?}: give at most one of present, exact or regex",
                    r.name
                ))
            }
        };
        Ok(HeaderMatch { name: r.name, value })
    }
}

impl From<HeaderMatch> for HeaderRepr {
    fn from(h: HeaderMatch) -> Self {
        let mut r = HeaderRepr {
            name: h.name,
            present: None,
            exact: None,
            regex: None,
        };
        match h.value {
            HeaderValue::Present => r.present = Some(true),
            HeaderValue::Absent => r.present = Some(false),
            HeaderValue::Exact(v) => r.exact = Some(v),
            HeaderValue::Regex(v) => r.regex = Some(v),
        }
        r
    }
}

/// One HTTP rule: a request matches when every field given matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// Matched against the normalised path (see `normalize_path`), without
    /// the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// Matched against the request's host (`:authority` or `Host`),
    /// lowercased and without its port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 16)))]
    pub headers: Vec<HeaderMatch>,
}

/// One gRPC rule: calls to `/service/method` (every method of the
/// service when `method` is left out), which are HTTP POSTs.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct GrpcRule {
    /// The fully qualified service, `pkg.Greeter`.
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"))
    )]
    pub service: String,
    /// The method; every method of the service when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(
        feature = "schema",
        schemars(length(min = 1, max = 256), regex(pattern = r"^[A-Za-z0-9_]+$"))
    )]
    pub method: Option<String>,
}

impl GrpcRule {
    /// The request path this rule matches: exact with a method, else the
    /// prefix `/service/`.
    pub fn path(&self) -> StringMatch {
        match &self.method {
            Some(m) => StringMatch::Exact(format!("/{}/{m}", self.service)),
            None => StringMatch::Prefix(format!("/{}/", self.service)),
        }
    }
}

/// The `rules` of one `toPorts` entry: a whitelist of requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(extend("x-kubernetes-validations" = [{
        "rule": "(has(self.http) && size(self.http) > 0) || (has(self.grpc) && size(self.grpc) > 0)",
        "message": "empty L7 rules allow no request; list http or grpc rules, or remove `rules` to allow the whole port"
    }]))
)]
#[serde(deny_unknown_fields)]
pub struct L7Rules {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 32)))]
    pub http: Vec<HttpRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(length(max = 32)))]
    pub grpc: Vec<GrpcRule>,
}

impl L7Rules {
    pub fn is_empty(&self) -> bool {
        self.http.is_empty() && self.grpc.is_empty()
    }

    /// Every error in the rules, each with its field path relative to
    /// `rules`. Empty when the rules compile.
    pub fn validate(&self) -> Vec<RuleError> {
        let mut errs = Vec::new();
        if self.is_empty() {
            errs.push(RuleError::new(
                "",
                "{}",
                "empty L7 rules allow no request; list http or grpc rules, or remove `rules` to allow the whole port",
            ));
        }
        for (i, r) in self.http.iter().enumerate() {
            let p = format!("http[{i}]");
            if let Some(m) = &r.method {
                check_method(&mut errs, &format!("{p}.method"), m);
            }
            if let Some(m) = &r.path {
                check_path(&mut errs, &format!("{p}.path"), m);
            }
            if let Some(m) = &r.host {
                check_host(&mut errs, &format!("{p}.host"), m);
            }
            for (j, h) in r.headers.iter().enumerate() {
                check_header(&mut errs, &format!("{p}.headers[{j}]"), h);
            }
        }
        for (i, g) in self.grpc.iter().enumerate() {
            let p = format!("grpc[{i}]");
            let svc_ok = !g.service.is_empty()
                && g.service
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                && !g.service.starts_with('.')
                && !g.service.ends_with('.')
                && !g.service.contains("..");
            if !svc_ok {
                errs.push(RuleError::new(
                    format!("{p}.service"),
                    &g.service,
                    "not a gRPC service name; write the fully qualified name, such as pkg.Greeter",
                ));
            }
            if let Some(m) = &g.method {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    errs.push(RuleError::new(
                        format!("{p}.method"),
                        m,
                        "not a gRPC method name (letters, digits and _); leave it out to allow every method",
                    ));
                }
            }
        }
        errs
    }
}

/// A rule that cannot be accepted. `path` is relative to `rules`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path} = {value:?}: {reason}")]
pub struct RuleError {
    pub path: String,
    pub value: String,
    pub reason: String,
}

impl RuleError {
    fn new(path: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> Self {
        RuleError {
            path: path.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// RFC 9110 section 5.6.2 `tchar`.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Compiles a rule regex the way the matcher does: anchored, size-limited.
pub(crate) fn build_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&anchored(re))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

pub(crate) fn anchored(re: &str) -> String {
    format!("^(?:{re})$")
}

fn check_regex(errs: &mut Vec<RuleError>, path: &str, re: &str) {
    if let Err(e) = build_regex(re) {
        let reason = match e {
            regex::Error::CompiledTooBig(_) => "regex too large once compiled; simplify it".to_string(),
            e => format!("not a valid regex (Rust regex syntax, matched against the whole value): {e}"),
        };
        errs.push(RuleError::new(format!("{path}.regex"), re, reason));
    }
}

fn check_method(errs: &mut Vec<RuleError>, path: &str, m: &StringMatch) {
    match m {
        StringMatch::Exact(v) => {
            if !HTTP_METHODS.contains(&v.as_str()) {
                let hint = if HTTP_METHODS.contains(&v.to_ascii_uppercase().as_str()) {
                    format!(
                        "methods are case-sensitive (RFC 9110 section 9.1); write {}",
                        v.to_ascii_uppercase()
                    )
                } else {
                    format!("unknown method; use one of {}", HTTP_METHODS.join(", "))
                };
                errs.push(RuleError::new(format!("{path}.exact"), v, hint));
            }
        }
        StringMatch::Prefix(v) => {
            if v.is_empty() || !v.bytes().all(is_tchar) {
                errs.push(RuleError::new(
                    format!("{path}.prefix"),
                    v,
                    "a method prefix must be a non-empty token (RFC 9110 section 9.1), such as P",
                ));
            }
        }
        StringMatch::Regex(v) => check_regex(errs, path, v),
    }
}

fn check_path(errs: &mut Vec<RuleError>, path: &str, m: &StringMatch) {
    let (kind, v) = match m {
        StringMatch::Regex(v) => return check_regex(errs, path, v),
        StringMatch::Exact(v) => ("exact", v),
        StringMatch::Prefix(v) => ("prefix", v),
    };
    let fp = format!("{path}.{kind}");
    if !v.starts_with('/') {
        errs.push(RuleError::new(fp, v, "a path must start with /"));
        return;
    }
    if v.contains('?') {
        errs.push(RuleError::new(
            fp,
            v,
            "the query is not matched; remove everything from ? on",
        ));
        return;
    }
    match crate::path::normalize_path(v) {
        Ok(n) if n == *v => {}
        Ok(n) => errs.push(RuleError::new(
            fp,
            v,
            format!("requests are matched in normal form (RFC 3986 section 6.2.2), so this never matches; write {n}"),
        )),
        Err(e) => errs.push(RuleError::new(fp, v, format!("no request can have this path: {e}"))),
    }
}

fn check_host(errs: &mut Vec<RuleError>, path: &str, m: &StringMatch) {
    let (kind, v) = match m {
        StringMatch::Regex(v) => return check_regex(errs, path, v),
        StringMatch::Exact(v) => ("exact", v),
        StringMatch::Prefix(v) => ("prefix", v),
    };
    let fp = format!("{path}.{kind}");
    if v.is_empty() {
        errs.push(RuleError::new(
            fp,
            v,
            "an empty host; leave host out to match every host",
        ));
    } else if v.bytes().any(|b| b.is_ascii_uppercase()) {
        errs.push(RuleError::new(
            fp,
            v,
            format!("hosts are compared lowercase; write {}", v.to_ascii_lowercase()),
        ));
    } else if !v.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_[]:".contains(&b)) {
        errs.push(RuleError::new(fp, v, "not a host name or address"));
    } else if kind == "exact" && has_port(v) {
        errs.push(RuleError::new(
            fp,
            v,
            "the port is stripped before hosts are compared; write the host without it",
        ));
    }
}

fn has_port(host: &str) -> bool {
    match host.rsplit_once(':') {
        Some((h, p)) => {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']'))
        }
        None => false,
    }
}

fn check_header(errs: &mut Vec<RuleError>, path: &str, h: &HeaderMatch) {
    if h.name.is_empty() || !h.name.bytes().all(is_tchar) {
        errs.push(RuleError::new(
            format!("{path}.name"),
            &h.name,
            "not a header name (RFC 9110 section 5.1 token)",
        ));
    }
    match &h.value {
        HeaderValue::Exact(v) => {
            if v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
                errs.push(RuleError::new(
                    format!("{path}.exact"),
                    v,
                    "a header value cannot hold control characters",
                ));
            }
        }
        HeaderValue::Regex(v) => check_regex(errs, path, v),
        HeaderValue::Present | HeaderValue::Absent => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> L7Rules {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn the_contract_shape_parses() {
        let r = rules(
            r#"
http:
- method: GET
  path: {prefix: /public}
  host: api.example.com
  headers:
  - {name: x-env, present: true}
  - {name: x-a, exact: prod}
  - {name: x-b, regex: "^p"}
  - {name: x-c, present: false}
  - {name: x-d}
grpc:
- {service: pkg.Greeter, method: SayHello}
- {service: pkg.Other}
"#,
        );
        let h = &r.http[0];
        assert_eq!(h.method, Some(StringMatch::Exact("GET".into())));
        assert_eq!(h.path, Some(StringMatch::Prefix("/public".into())));
        assert_eq!(h.host, Some(StringMatch::Exact("api.example.com".into())));
        let values: Vec<_> = h.headers.iter().map(|h| h.value.clone()).collect();
        assert_eq!(
            values,
            vec![
                HeaderValue::Present,
                HeaderValue::Exact("prod".into()),
                HeaderValue::Regex("^p".into()),
                HeaderValue::Absent,
                HeaderValue::Present,
            ]
        );
        assert_eq!(r.grpc[0].path(), StringMatch::Exact("/pkg.Greeter/SayHello".into()));
        assert_eq!(r.grpc[1].path(), StringMatch::Prefix("/pkg.Other/".into()));
        assert!(r.validate().is_empty(), "{:?}", r.validate());
        // Serialising and parsing again gives the same rules.
        let text = serde_yaml::to_string(&r).unwrap();
        assert_eq!(rules(&text), r);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<L7Rules>(&json).unwrap(), r);
    }

    #[test]
    fn shape_errors_are_refused_by_serde() {
        for bad in [
            "http: [{method: {exact: GET, prefix: G}}]",
            "http: [{method: {}}]",
            "http: [{method: {glob: G}}]",
            "http: [{verb: GET}]",
            "http: [{headers: [{name: a, exact: b, regex: c}]}]",
            "grpc: [{method: M}]",
            "kafka: []",
        ] {
            assert!(serde_yaml::from_str::<L7Rules>(bad).is_err(), "{bad}");
        }
    }

    /// RFC 9110 section 9: the registered methods, case-sensitive.
    #[test]
    fn methods_follow_rfc_9110() {
        for m in HTTP_METHODS {
            let r = L7Rules {
                http: vec![HttpRule {
                    method: Some(StringMatch::Exact(m.into())),
                    ..Default::default()
                }],
                grpc: vec![],
            };
            assert!(r.validate().is_empty(), "{m}");
        }
        let errs =
            rules("http: [{method: get}, {method: FETCH}, {method: {prefix: 'P T'}}, {method: {regex: 'GET|PO(ST'}}]")
                .validate();
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "http[0].method.exact",
                "http[1].method.exact",
                "http[2].method.prefix",
                "http[3].method.regex"
            ]
        );
        assert!(errs[0].reason.contains("write GET"), "{}", errs[0]);
        assert!(errs[1].reason.contains("unknown method"), "{}", errs[1]);
    }

    #[test]
    fn values_are_validated_with_field_paths() {
        let errs = rules(
            r#"
http:
- path: public
- path: {prefix: /a/../b}
- path: {regex: "(("}
- path: {exact: "/a%2Fb"}
- host: API.example.com
- host: "api.example.com:8080"
- headers: [{name: "bad name", present: true}, {name: x, regex: "[z-a]"}]
grpc:
- {service: ""}
- {service: pkg.Svc, method: "a/b"}
"#,
        )
        .validate();
        let got: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            got,
            [
                "http[0].path.exact",
                "http[1].path.prefix",
                "http[2].path.regex",
                "http[3].path.exact",
                "http[4].host.exact",
                "http[5].host.exact",
                "http[6].headers[0].name",
                "http[6].headers[1].regex",
                "grpc[0].service",
                "grpc[1].method",
            ]
        );
        assert!(errs[1].reason.contains("write /b"), "{}", errs[1]);
        assert!(errs.iter().all(|e| !e.reason.is_empty()));
        assert_eq!(rules("{}").validate()[0].path, "");
    }

    #[test]
    fn oversized_regex_is_refused() {
        let r = L7Rules {
            http: vec![HttpRule {
                path: Some(StringMatch::Regex(r"(\w{100}){100}".into())),
                ..Default::default()
            }],
            grpc: vec![],
        };
        let errs = r.validate();
        assert_eq!(errs.len(), 1);
        assert!(errs[0].reason.contains("too large"), "{}", errs[0]);
    }
}
