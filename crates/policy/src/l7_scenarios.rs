//! L7 rules in policies: validation with field paths, which entries
//! redirect to the proxy (Cilium's semantics), and `trace_l7`.

use std::collections::BTreeMap;

use crate::identity::{identity_labels, Identity, IdentityKind, IgnoreRules, Reserved};
use crate::model::{parse, Direction, Proto};
use crate::resolve::{resolve, Endpoint, Peer, Resolved};
use crate::trace::{trace_l7, HttpRequest, L7Reason, Verdict};

use Direction::{Egress, Ingress};

const WEB: u32 = 300;
const CLIENT: u32 = 301;
const OTHER: u32 = 302;
const DB: u32 = 303;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn setup() -> (Endpoint, Vec<Identity>, BTreeMap<String, BTreeMap<String, String>>) {
    let ns_labels = labels(&[("kubernetes.io/metadata.name", "a")]);
    let namespaces: BTreeMap<_, _> = [("a".to_string(), ns_labels.clone())].into_iter().collect();
    let mut identities = vec![Identity::reserved(Reserved::World), Identity::reserved(Reserved::Host)];
    for (id, app) in [(WEB, "web"), (CLIENT, "client"), (OTHER, "other"), (DB, "db")] {
        identities.push(Identity {
            id,
            kind: IdentityKind::Pod {
                labels: identity_labels("a", &labels(&[("app", app)]), &ns_labels, None, &IgnoreRules::default()),
                named_ports: [("http".to_string(), (Proto::Tcp, 8080))].into_iter().collect(),
            },
        });
    }
    let web = Endpoint {
        namespace: "a".into(),
        pod_labels: labels(&[("app", "web")]),
        identity: WEB,
        named_ports: [("http".to_string(), (Proto::Tcp, 8080))].into_iter().collect(),
    };
    (web, identities, namespaces)
}

fn resolved(yaml: &str) -> Resolved {
    let (web, identities, namespaces) = setup();
    let policies = parse("l7.yaml", yaml).unwrap_or_else(|e| panic!("{e:#?}"));
    resolve(&web, &policies, &identities, &namespaces)
}

fn get(target: &str) -> HttpRequest {
    HttpRequest {
        method: "GET".into(),
        target: target.into(),
        host: None,
        headers: vec![],
    }
}

const HEAD: &str = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: web, namespace: a}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n";

/// GET /public allowed to the client on port 80, nothing else.
const PUBLIC_ONLY: &str = r#"
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: {prefix: /public/}}
        - {method: {regex: "PUT|PATCH"}, path: /items, headers: [{name: x-env, exact: prod}]}
"#;

#[test]
fn ingress_l7_rules_redirect_and_judge_requests() {
    let r = resolved(&format!("{HEAD}{PUBLIC_ONLY}"));
    let e = r
        .datapath_entry(Ingress, CLIENT, None, Proto::Tcp, 80)
        .expect("an allow entry");
    assert!(r.redirects(e) && e.peer == Peer::Identity(CLIENT));
    assert_eq!(r.l7_ports(), vec![(Ingress, 80)]);

    let t = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/public/index.html"));
    assert!(t.redirected);
    assert_eq!(t.verdict, Verdict::Allowed);
    let rule = "SinewNetworkPolicy a/web ingress[0].toPorts[0].rules.http[0]";
    assert_eq!(t.reason, L7Reason::AllowedBy(rule.into()));
    assert!(
        t.explanation.ends_with(&format!(
            "GET /public/index.html: redirected to the proxy, allowed by {rule}"
        )),
        "{}",
        t.explanation
    );

    let t = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/admin"));
    assert_eq!((t.verdict, t.reason), (Verdict::Denied, L7Reason::NoRuleMatched));
    assert!(t.explanation.contains("denied (403)"), "{}", t.explanation);

    // The path judged is the normalised one.
    let t = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/public/../admin?x=1"));
    assert_eq!(t.verdict, Verdict::Denied);
    assert_eq!(t.path.as_deref(), Some("/admin"));
    assert!(
        t.explanation.contains("judged and forwarded as /admin"),
        "{}",
        t.explanation
    );
    let t = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/public%2F..%2Fadmin"));
    assert!(matches!(t.reason, L7Reason::BadTarget(_)), "{t:?}");

    // Method, header.
    let put = |env: &str| HttpRequest {
        method: "PUT".into(),
        target: "/items".into(),
        host: Some("web.a".into()),
        headers: vec![("X-Env".into(), env.into())],
    };
    assert_eq!(
        trace_l7(&r, Ingress, CLIENT, None, 80, &put("prod")).verdict,
        Verdict::Allowed
    );
    assert_eq!(
        trace_l7(&r, Ingress, CLIENT, None, 80, &put("dev")).verdict,
        Verdict::Denied
    );

    // Another peer never reaches L7; another port is not redirected.
    let t = trace_l7(&r, Ingress, OTHER, None, 80, &get("/public/x"));
    assert_eq!(
        (t.verdict, t.reason, t.redirected),
        (Verdict::Denied, L7Reason::L4Denied, false)
    );
    let t = trace_l7(&r, Ingress, CLIENT, None, 81, &get("/public/x"));
    assert_eq!(t.reason, L7Reason::L4Denied);
}

#[test]
fn a_rule_without_l7_on_the_same_port_opens_it() {
    // Same peer, two rules, one without L7 rules: no redirect.
    let r = resolved(&format!(
        "{HEAD}{PUBLIC_ONLY}  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
    ));
    assert!(r.entries.iter().all(|e| !e.redirects()), "{:#?}", r.entries);
    let t = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/admin"));
    assert_eq!(
        (t.verdict, t.reason, t.redirected),
        (Verdict::Allowed, L7Reason::NotRedirected, false)
    );

    // A broader plain rule (a port range) for the same peer: no redirect either.
    let r = resolved(&format!(
        "{HEAD}{PUBLIC_ONLY}  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"1\", endPort: 1000, protocol: TCP}}]}}]\n"
    ));
    assert_eq!(
        trace_l7(&r, Ingress, CLIENT, None, 80, &get("/admin")).reason,
        L7Reason::NotRedirected
    );

    // A plain rule for any peer on that port opens it to every peer, the
    // client included; a plain rule for the client alone leaves others
    // under the any-peer L7 rules.
    let r = resolved(&format!(
        r#"{HEAD}  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "80", protocol: TCP}}]}}]
  - toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{http: [{{path: /ok}}]}}
"#
    ));
    let client = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/admin"));
    assert_eq!(client.reason, L7Reason::NotRedirected, "{}", client.explanation);
    let other = trace_l7(&r, Ingress, OTHER, None, 80, &get("/admin"));
    assert_eq!(other.reason, L7Reason::NoRuleMatched, "{}", other.explanation);
    assert_eq!(
        trace_l7(&r, Ingress, OTHER, None, 80, &get("/ok")).verdict,
        Verdict::Allowed
    );
    // The client's own entry on port 80 must exist and not redirect, or
    // the datapath would fall through to the any-peer redirect.
    let e = r.datapath_entry(Ingress, CLIENT, None, Proto::Tcp, 80).unwrap();
    assert!(e.peer == Peer::Identity(CLIENT) && !e.redirects(), "{e:?}");
}

#[test]
fn l7_rules_of_every_allowing_rule_are_unioned() {
    let r = resolved(&format!(
        r#"{HEAD}  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{http: [{{path: /a}}]}}
  - toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{http: [{{path: /b}}]}}
"#
    ));
    let sets = r.l7_rule_sets(Ingress, 80);
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].rule, "SinewNetworkPolicy a/web ingress[0].toPorts[0]");
    assert_eq!(sets[0].peers, vec![sinew_l7::Peer::Identity(CLIENT)]);
    assert_eq!(sets[1].peers, vec![sinew_l7::Peer::Any]);
    for (peer, path, want) in [
        (CLIENT, "/a", Verdict::Allowed),
        (CLIENT, "/b", Verdict::Allowed),
        (CLIENT, "/c", Verdict::Denied),
        (OTHER, "/a", Verdict::Denied),
        (OTHER, "/b", Verdict::Allowed),
    ] {
        let t = trace_l7(&r, Ingress, peer, None, 80, &get(path));
        assert!(t.redirected);
        assert_eq!(t.verdict, want, "{}", t.explanation);
    }
}

#[test]
fn deny_still_wins() {
    let r = resolved(&format!(
        "{HEAD}{PUBLIC_ONLY}  ingressDeny:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
    ));
    let t = trace_l7(&r, Ingress, CLIENT, None, 80, &get("/public/x"));
    assert_eq!((t.verdict, t.reason), (Verdict::Denied, L7Reason::L4Denied));
    assert!(
        t.explanation
            .contains("denied by SinewNetworkPolicy a/web ingressDeny[0]"),
        "{}",
        t.explanation
    );
}

#[test]
fn egress_grpc_rules_and_named_ports() {
    let r = resolved(&format!(
        r#"{HEAD}  egress:
  - toEndpoints: [{{matchLabels: {{app: db}}}}]
    toPorts:
    - ports: [{{port: "9000", protocol: TCP}}]
      rules: {{grpc: [{{service: pkg.Store, method: Get}}]}}
  - toEndpoints: [{{matchLabels: {{app: db}}}}]
    toPorts:
    - ports: [{{port: http}}]
      rules: {{http: [{{method: GET}}]}}
"#
    ));
    assert_eq!(r.l7_ports(), vec![(Egress, 8080), (Egress, 9000)]);
    let t = trace_l7(&r, Egress, DB, None, 9000, &HttpRequest::grpc("pkg.Store/Get"));
    assert_eq!(t.verdict, Verdict::Allowed, "{}", t.explanation);
    assert_eq!(
        t.reason,
        L7Reason::AllowedBy("SinewNetworkPolicy a/web egress[0].toPorts[0].rules.grpc[0]".into())
    );
    let t = trace_l7(&r, Egress, DB, None, 9000, &HttpRequest::grpc("/pkg.Store/Put"));
    assert_eq!(t.reason, L7Reason::NoRuleMatched);
    let t = trace_l7(&r, Egress, DB, None, 8080, &get("/x"));
    assert_eq!(t.verdict, Verdict::Allowed, "{}", t.explanation);
    // Ingress is untouched by egress L7 rules.
    assert!(!r.enforced(Ingress));
}

#[test]
fn any_protocol_port_with_l7_rules_allows_only_tcp() {
    let r = resolved(&format!(
        "{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\"}}]\n      rules: {{http: [{{path: /x}}]}}\n"
    ));
    let udp = crate::trace(&r, Ingress, CLIENT, None, Proto::Udp, 80);
    assert_eq!(udp.verdict, Verdict::Denied, "{}", udp.explanation);
    assert!(trace_l7(&r, Ingress, CLIENT, None, 80, &get("/x")).redirected);
}

#[test]
fn policies_without_l7_rules_resolve_as_before() {
    let r = resolved(&format!(
        "{HEAD}  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]\n"
    ));
    assert_eq!(r.entries.len(), 1);
    assert!(r.entries.iter().all(|e| e.l7.is_empty()));
    assert!(r.l7_ports().is_empty() && r.l7_rule_sets(Ingress, 80).is_empty());
}

#[test]
fn invalid_l7_rules_are_rejected_with_their_field_path() {
    let yaml = format!(
        r#"{HEAD}  ingress:
  - toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules:
        http:
        - {{method: FETCH}}
        - {{path: {{regex: "(("}}}}
    - ports: [{{port: "53", protocol: UDP}}]
      rules: {{http: [{{method: GET}}]}}
    - ports: [{{port: "80", endPort: 90, protocol: TCP}}]
      rules: {{http: [{{method: GET}}]}}
    - rules: {{http: [{{method: GET}}]}}
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{grpc: [{{service: ""}}]}}
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{}}
  ingressDeny:
  - toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
      rules: {{http: [{{method: GET}}]}}
"#
    );
    let errors = parse("bad.yaml", &yaml).unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "spec.ingress[0].toPorts[0].rules.http[0].method.exact",
            "spec.ingress[0].toPorts[0].rules.http[1].path.regex",
            "spec.ingress[0].toPorts[1].ports[0].protocol",
            "spec.ingress[0].toPorts[2].ports[0].endPort",
            "spec.ingress[0].toPorts[3].rules",
            "spec.ingress[0].toPorts[4].rules.grpc[0].service",
            "spec.ingress[0].toPorts[5].rules",
            "spec.ingressDeny[0].toPorts[0].rules",
        ],
        "{errors:#?}"
    );
    let text = errors[0].to_string();
    assert!(
        text.contains("SinewNetworkPolicy a/web: spec.ingress[0].toPorts[0].rules.http[0].method.exact = \"FETCH\": unknown method"),
        "{text}"
    );

    // Shape errors come from serde with their path too.
    let errors = parse(
        "bad.yaml",
        &format!("{HEAD}  ingress:\n  - toPorts:\n    - ports: [{{port: \"80\"}}]\n      rules: {{http: [{{path: {{glob: /x}}}}]}}\n"),
    )
    .unwrap_err();
    assert!(
        errors[0]
            .path
            .starts_with("spec.ingress[0].toPorts[0].rules.http[0].path"),
        "{errors:#?}"
    );
}

/// The README's example file parses and redirects what it says.
#[test]
fn the_readme_example_parses() {
    let text = include_str!("../../../examples/l7-policy.yaml");
    let policies = parse("examples/l7-policy.yaml", text).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(policies.len(), 1);
    let l7: Vec<_> = policies[0].l7_rules().collect();
    assert_eq!(l7.len(), 2);
    assert_eq!(l7[0].2.http.len(), 2);
    assert_eq!(l7[1].2.grpc[0].service, "pkg.Store");
}
