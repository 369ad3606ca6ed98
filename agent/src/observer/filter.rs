//! Which flows a GetFlows request selects: pure functions over the API's
//! types, so the server and its tests agree on one meaning.

use sinew_proto::observer_v1 as pb;

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

/// Checks a request before serving it: label filters need `key=value`.
pub fn validate(req: &pb::GetFlowsRequest) -> Result<(), String> {
    for flt in &req.filters {
        for l in &flt.labels {
            if !l.contains('=') || l.starts_with('=') {
                return Err(format!("label filter {l:?}: use key=value"));
            }
        }
    }
    if req.until_unix_nanos != 0 && req.since_unix_nanos > req.until_unix_nanos {
        return Err("since is after until: nothing can match".into());
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
}
