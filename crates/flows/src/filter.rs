//! Which flows a GetFlows request selects: pure functions over the API's
//! types, so the server and its tests agree on one meaning.

use sinew_proto::observer_v1 as pb;

/// A filter argument that cannot select anything: refused, so that a typo
/// is not read as "no such flows".
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("{field} {value:?}: use NAMESPACE/NAME or NAME (a name is lower-case letters, digits, '-' and '.'; a namespace lower-case letters, digits and '-')")]
    Pod { field: &'static str, value: String },
    #[error("{field} {value:?}: a namespace is lower-case letters, digits and '-' (at most 63, starting and ending with a letter or digit)")]
    Namespace { field: &'static str, value: String },
    #[error("{field} {value:?}: use key=value (a key is [prefix/]name, a name and a value letters, digits, '-', '_' and '.', at most 63; the value may be empty)")]
    Label { field: &'static str, value: String },
    #[error("since is after until: nothing can match")]
    TimeRange,
}

/// A DNS-1123 label: a namespace, or one part of a pod name.
fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A DNS-1123 subdomain: what a pod's name is.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// A label name or value: alphanumerics with '-', '_', '.' inside.
fn label_word(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// `NAMESPACE/NAME` or `NAME`, as `--pod`, `--from-pod`, `--to-pod` take.
pub fn check_pod(field: &'static str, value: &str) -> Result<(), FilterError> {
    let ok = match value.split_once('/') {
        Some((ns, name)) => dns_label(ns) && dns_subdomain(name),
        None => dns_subdomain(value),
    };
    ok.then_some(()).ok_or_else(|| FilterError::Pod {
        field,
        value: value.into(),
    })
}

pub fn check_namespace(field: &'static str, value: &str) -> Result<(), FilterError> {
    dns_label(value).then_some(()).ok_or_else(|| FilterError::Namespace {
        field,
        value: value.into(),
    })
}

/// `key=value` with a Kubernetes label key (`[prefix/]name`) and value.
pub fn check_label(field: &'static str, value: &str) -> Result<(), FilterError> {
    let ok = value.split_once('=').is_some_and(|(k, v)| {
        let key = match k.split_once('/') {
            Some((prefix, name)) => dns_subdomain(prefix) && label_word(name),
            None => label_word(k),
        };
        key && (v.is_empty() || label_word(v))
    });
    ok.then_some(()).ok_or_else(|| FilterError::Label {
        field,
        value: value.into(),
    })
}

/// "ns/name" matches that pod; "name" matches the name in any namespace.
fn pod_is(e: Option<&pb::Endpoint>, want: &str) -> bool {
    let Some(e) = e else { return false };
    if e.pod_name.is_empty() {
        return false;
    }
    match want.split_once('/') {
        Some((ns, name)) => e.namespace == ns && e.pod_name == name,
        None => e.pod_name == want,
    }
}

fn has_labels(e: Option<&pb::Endpoint>, labels: &[(&str, &str)]) -> bool {
    e.is_some_and(|e| labels.iter().all(|(k, v)| e.labels.get(*k).is_some_and(|x| x == v)))
}

/// Whether one filter selects the flow: every field set must match.
pub fn matches(f: &pb::Flow, flt: &pb::FlowFilter) -> bool {
    let (src, dst) = (f.source.as_ref(), f.destination.as_ref());
    let either = |p: &dyn Fn(&pb::Endpoint) -> bool| src.is_some_and(p) || dst.is_some_and(p);
    if !(flt.pod.is_empty() || pod_is(src, &flt.pod) || pod_is(dst, &flt.pod)) {
        return false;
    }
    if !flt.from_pod.is_empty() && !pod_is(src, &flt.from_pod) {
        return false;
    }
    if !flt.to_pod.is_empty() && !pod_is(dst, &flt.to_pod) {
        return false;
    }
    if !flt.namespace.is_empty() && !either(&|e| e.namespace == flt.namespace) {
        return false;
    }
    if !flt.labels.is_empty() {
        let labels: Vec<(&str, &str)> = flt
            .labels
            .iter()
            .map(|l| l.split_once('=').unwrap_or((l.as_str(), "")))
            .collect();
        if !(has_labels(src, &labels) || has_labels(dst, &labels)) {
            return false;
        }
    }
    if let Some(id) = flt.identity {
        if !either(&|e| e.identity == id) {
            return false;
        }
    }
    if flt.verdict != 0 && flt.verdict != f.verdict {
        return false;
    }
    if let Some(code) = flt.drop_reason {
        if f.drop_reason.as_ref().is_none_or(|r| r.code != code) {
            return false;
        }
    }
    if let Some(p) = flt.protocol {
        if f.protocol != p {
            return false;
        }
    }
    if let Some(port) = flt.port {
        if !either(&|e| e.port == port) {
            return false;
        }
    }
    if flt.direction != 0 && flt.direction != f.direction {
        return false;
    }
    if flt.event_type != 0 && flt.event_type != f.r#type {
        return false;
    }
    true
}

/// Whether a request selects the flow: its time range, and any of its
/// filters (none: all).
pub fn selects(req: &pb::GetFlowsRequest, f: &pb::Flow) -> bool {
    if req.since_unix_nanos != 0 && f.time_unix_nanos < req.since_unix_nanos {
        return false;
    }
    if req.until_unix_nanos != 0 && f.time_unix_nanos > req.until_unix_nanos {
        return false;
    }
    req.filters.is_empty() || req.filters.iter().any(|flt| matches(f, flt))
}

/// Checks a request before serving it: every pod, namespace and label a
/// filter names must be one that can exist (unset fields are empty).
pub fn validate(req: &pb::GetFlowsRequest) -> Result<(), FilterError> {
    for flt in &req.filters {
        for (field, v) in [("pod", &flt.pod), ("from_pod", &flt.from_pod), ("to_pod", &flt.to_pod)] {
            if !v.is_empty() {
                check_pod(field, v)?;
            }
        }
        if !flt.namespace.is_empty() {
            check_namespace("namespace", &flt.namespace)?;
        }
        for l in &flt.labels {
            check_label("labels", l)?;
        }
    }
    if req.until_unix_nanos != 0 && req.since_unix_nanos > req.until_unix_nanos {
        return Err(FilterError::TimeRange);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ns: &str, pod: &str, port: u32, identity: u32, app: &str) -> pb::Endpoint {
        pb::Endpoint {
            namespace: ns.into(),
            pod_name: pod.into(),
            port,
            identity,
            labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        }
    }

    fn flow() -> pb::Flow {
        pb::Flow {
            time_unix_nanos: 100,
            source: Some(ep("a", "client", 40000, 300, "client")),
            destination: Some(ep("b", "db", 5432, 301, "db")),
            verdict: pb::Verdict::Dropped as i32,
            drop_reason: Some(pb::DropReason {
                code: 15,
                ..Default::default()
            }),
            protocol: 6,
            direction: pb::TrafficDirection::Ingress as i32,
            r#type: pb::EventType::Drop as i32,
            ..Default::default()
        }
    }

    #[test]
    fn each_field_includes_and_excludes() {
        let f = flow();
        let yes_no: Vec<(pb::FlowFilter, pb::FlowFilter)> = vec![
            (
                pb::FlowFilter {
                    pod: "a/client".into(),
                    ..Default::default()
                },
                pb::FlowFilter {
                    pod: "b/client".into(),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    pod: "db".into(),
                    ..Default::default()
                },
                pb::FlowFilter {
                    pod: "web".into(),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    namespace: "b".into(),
                    ..Default::default()
                },
                pb::FlowFilter {
                    namespace: "c".into(),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    from_pod: "client".into(),
                    ..Default::default()
                },
                pb::FlowFilter {
                    from_pod: "db".into(),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    to_pod: "b/db".into(),
                    ..Default::default()
                },
                pb::FlowFilter {
                    to_pod: "a/client".into(),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    labels: vec!["app=db".into()],
                    ..Default::default()
                },
                pb::FlowFilter {
                    labels: vec!["app=client".into(), "x=y".into()],
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    identity: Some(301),
                    ..Default::default()
                },
                pb::FlowFilter {
                    identity: Some(2),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    verdict: pb::Verdict::Dropped as i32,
                    ..Default::default()
                },
                pb::FlowFilter {
                    verdict: pb::Verdict::Forwarded as i32,
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    drop_reason: Some(15),
                    ..Default::default()
                },
                pb::FlowFilter {
                    drop_reason: Some(16),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    protocol: Some(6),
                    ..Default::default()
                },
                pb::FlowFilter {
                    protocol: Some(17),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    port: Some(40000),
                    ..Default::default()
                },
                pb::FlowFilter {
                    port: Some(80),
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    direction: pb::TrafficDirection::Ingress as i32,
                    ..Default::default()
                },
                pb::FlowFilter {
                    direction: pb::TrafficDirection::Egress as i32,
                    ..Default::default()
                },
            ),
            (
                pb::FlowFilter {
                    event_type: pb::EventType::Drop as i32,
                    ..Default::default()
                },
                pb::FlowFilter {
                    event_type: pb::EventType::Trace as i32,
                    ..Default::default()
                },
            ),
        ];
        for (yes, no) in yes_no {
            assert!(matches(&f, &yes), "{yes:?} should select the flow");
            assert!(!matches(&f, &no), "{no:?} should not select the flow");
        }
    }

    #[test]
    fn request_time_range_and_any_of_filters() {
        let f = flow();
        let mut req = pb::GetFlowsRequest {
            since_unix_nanos: 100,
            until_unix_nanos: 100,
            ..Default::default()
        };
        assert!(selects(&req, &f));
        req.since_unix_nanos = 101;
        assert!(!selects(&req, &f));
        req.since_unix_nanos = 0;
        req.until_unix_nanos = 99;
        assert!(!selects(&req, &f));
        req.until_unix_nanos = 0;
        req.filters = vec![
            pb::FlowFilter {
                pod: "nope".into(),
                ..Default::default()
            },
            pb::FlowFilter {
                pod: "db".into(),
                ..Default::default()
            },
        ];
        assert!(selects(&req, &f));
        req.filters.remove(1);
        assert!(!selects(&req, &f));
        req.filters[0].labels = vec!["novalue".into()];
        assert!(validate(&req).is_err());
    }

    /// Arguments that cannot name a pod, namespace or label are refused,
    /// with the field; the forms that can are accepted.
    #[test]
    fn filter_arguments_must_be_able_to_name_something() {
        for ok in ["web", "a/web", "kube-system/coredns-7db6d8ff4d-abc12", "a/web.v1"] {
            assert_eq!(check_pod("--pod", ok), Ok(()), "{ok}");
        }
        for bad in ["a/b/c", "/web", "a/", "", "A/web", "a_b", "web-", "a//b", "a/b c"] {
            let e = check_pod("--pod", bad).unwrap_err();
            assert!(e.to_string().starts_with("--pod "), "{e}");
            assert!(e.to_string().contains("NAMESPACE/NAME or NAME"), "{e}");
        }
        assert!(check_namespace("--namespace", "kube-system").is_ok());
        for bad in ["a/b", "", "Team", &"x".repeat(64)] {
            assert!(check_namespace("--namespace", bad).is_err(), "{bad}");
        }
        for ok in ["app=web", "app=", "sinew.io/ns.team=a", "k8s.io/x_y=A-1.b"] {
            assert_eq!(check_label("--label", ok), Ok(()), "{ok}");
        }
        for bad in ["app", "=web", "app=a=b", "app=-x", "/app=x", "a b=c"] {
            assert!(check_label("--label", bad).is_err(), "{bad}");
        }
        let req = |flt: pb::FlowFilter| pb::GetFlowsRequest {
            filters: vec![flt],
            ..Default::default()
        };
        let e = validate(&req(pb::FlowFilter {
            to_pod: "a/b/c".into(),
            ..Default::default()
        }))
        .unwrap_err();
        assert!(e.to_string().starts_with("to_pod \"a/b/c\""), "{e}");
        assert!(validate(&req(pb::FlowFilter {
            pod: "a/client".into(),
            namespace: "b".into(),
            labels: vec!["app=db".into()],
            ..Default::default()
        }))
        .is_ok());
    }
}
