use super::*;

/// Parses `yaml` expecting exactly one error, and returns it.
fn reject(yaml: &str) -> PolicyError {
    let errors = parse("test.yaml", yaml).expect_err("policy should be rejected");
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn assert_rejected(yaml: &str, path: &str, value: &str, reason: &str) {
    let e = reject(yaml);
    assert_eq!(e.path, path, "{e}");
    assert_eq!(e.value, value, "{e}");
    assert!(
        e.reason.contains(reason),
        "reason {:?} should contain {reason:?}",
        e.reason
    );
    assert_eq!(e.file, "test.yaml");
}

const SINEW_HEAD: &str = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: p, namespace: a}\n";
const K8S_HEAD: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\n";

fn sinew(spec: &str) -> String {
    format!("{SINEW_HEAD}spec:\n{spec}")
}

fn k8s(spec: &str) -> String {
    format!("{K8S_HEAD}spec:\n{spec}")
}

#[test]
fn parses_both_families_from_one_stream_and_skips_other_kinds() {
    let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: not-a-policy}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: also-not-a-policy}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  creationTimestamp: null
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {}}]
    ports: [{port: 80}, {port: http, protocol: UDP}, {port: 8000, endPort: 9000}]
---
apiVersion: sinew.io/v1alpha1
kind: SinewClusterwideNetworkPolicy
metadata: {name: cw}
spec:
  endpointSelector: {}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts:
    - ports: [{port: "5432", protocol: TCP}]
      rules: {http: [{method: GET}]}
"#;
    let policies = parse("multi.yaml", yaml).unwrap();
    assert_eq!(policies.len(), 2);
    let np = &policies[0];
    assert_eq!(np.kind(), PolicyKind::NetworkPolicy);
    assert_eq!(np.namespace(), Some("default"), "unset namespace means default");
    assert_eq!(np.name(), "web");
    assert_eq!(np.source(), "multi.yaml");
    assert!(np.isolates_ingress && !np.isolates_egress);
    let ports = &np.sections[0].1[0].port_rules[0].ports;
    assert_eq!(
        ports,
        &vec![
            PortSel::Range {
                proto: Some(Proto::Tcp),
                range: Some((80, 80))
            },
            PortSel::Named {
                proto: Some(Proto::Udp),
                name: "http".into()
            },
            PortSel::Range {
                proto: Some(Proto::Tcp),
                range: Some((8000, 9000))
            },
        ]
    );
    let cw = &policies[1];
    assert_eq!(cw.kind(), PolicyKind::SinewClusterwideNetworkPolicy);
    assert_eq!(cw.namespace(), None);
    assert!(!cw.isolates_ingress && cw.isolates_egress);
    let l7: Vec<_> = cw.l7_rules().collect();
    assert_eq!(l7.len(), 1);
    assert_eq!(l7[0].0, Section::Egress);
    assert_eq!(l7[0].2.http[0].method, Some(sinew_l7::StringMatch::Exact("GET".into())));
}

#[test]
fn parse_all_keeps_valid_documents_next_to_errors() {
    let yaml = format!(
        "{}---\n{}",
        k8s("  podSelector: {}\n"),
        k8s("  podSelector: {}\n  policyTypes: [Sideways]\n").replace("name: p", "name: q")
    );
    let (ok, errors) = parse_all("x", &yaml);
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].name(), "p");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].document, 1);
    assert_eq!(errors[0].name.as_deref(), Some("q"));
    assert_eq!(errors[0].namespace.as_deref(), Some("a"));
    assert_eq!(errors[0].kind, "NetworkPolicy");
    assert_eq!(
        errors[0].to_string(),
        "x document 1: NetworkPolicy a/q: spec.policyTypes[0] = \"Sideways\": unknown policy type; use Ingress or Egress"
    );
}

#[test]
fn parse_documents_keeps_each_policy_with_its_own_document_once() {
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n";
    let yaml = format!(
        "{}---\n{service}---\n{}",
        k8s("  podSelector: {}\n"),
        k8s("  podSelector: {}\n").replace("name: p", "name: q")
    );
    let docs = parse_documents("x", &yaml).unwrap();
    let names: Vec<&str> = docs.iter().map(|d| d.resource.name()).collect();
    assert_eq!(names, ["p", "q"], "other kinds are skipped");
    for d in &docs {
        // Each text is its own document, and parses back to the same policy.
        assert!(!d.yaml.contains("---") && !d.yaml.contains("Service"), "{}", d.yaml);
        let again = parse("x", &d.yaml).unwrap();
        assert_eq!(again, vec![d.resource.clone()]);
    }
    let bad = yaml.replace("podSelector: {}\n", "podSelector: {}\n  policyTypes: [Sideways]\n");
    let errors = parse_documents("x", &bad).unwrap_err();
    assert_eq!(errors.len(), 2, "every error, none applied: {errors:?}");
}

#[test]
fn rejects_bad_selector_operator() {
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - fromEndpoints:\n    - matchExpressions: [{key: app, operator: Equals, values: [x]}]\n"),
        "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator",
        "Equals",
        "unknown operator",
    );
    assert_rejected(
        &k8s("  podSelector:\n    matchExpressions: [{key: app, operator: in, values: [x]}]\n"),
        "spec.podSelector.matchExpressions[0].operator",
        "in",
        "use In, NotIn, Exists or DoesNotExist",
    );
}

#[test]
fn rejects_in_and_notin_without_values() {
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{key: team, operator: NotIn, values: []}]\n"),
        "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values",
        "",
        "needs at least one value",
    );
    assert_rejected(
        &sinew("  endpointSelector:\n    matchExpressions: [{key: app, operator: In}]\n"),
        "spec.endpointSelector.matchExpressions[0].values",
        "",
        "needs at least one value",
    );
}

#[test]
fn rejects_unknown_fields_with_path() {
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: 80}, {port: 81, proto: TCP}]\n"),
        "spec.ingress[0].toPorts[0].ports[1].proto",
        "proto",
        "unknown field",
    );
    // An ingress rule cannot use egress peer fields.
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toEndpoints: [{}]\n"),
        "spec.ingress[0].toEndpoints",
        "toEndpoints",
        "unknown field",
    );
    // A misspelt matchLabels would otherwise select everything.
    assert_rejected(
        &sinew("  endpointSelector: {matchLabel: {app: web}}\n"),
        "spec.endpointSelector.matchLabel",
        "matchLabel",
        "unknown field",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - from:\n    - podSelecter: {matchLabels: {app: x}}\n"),
        "spec.ingress[0].from[0].podSelecter",
        "podSelecter",
        "unknown field",
    );
}

#[test]
fn rejects_ports_out_of_range() {
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: 80}, {port: \"70000\"}]\n"),
        "spec.ingress[0].toPorts[0].ports[1].port",
        "70000",
        "between 1 and 65535",
    );
    assert_rejected(
        &sinew("  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports: [{port: 0}]\n"),
        "spec.egress[0].toPorts[0].ports[0].port",
        "0",
        "between 1 and 65535",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - ports: [{port: 65536}]\n"),
        "spec.ingress[0].ports[0].port",
        "65536",
        "between 1 and 65535",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - ports: [{port: 80, endPort: 70000}]\n"),
        "spec.ingress[0].ports[0].endPort",
        "70000",
        "between 1 and 65535",
    );
}

#[test]
fn rejects_end_port_below_port() {
    assert_rejected(
        &k8s("  podSelector: {}\n  egress:\n  - ports: [{port: 9000, endPort: 8000}]\n"),
        "spec.egress[0].ports[0].endPort",
        "8000",
        "must not be below port 9000",
    );
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"90\", endPort: 89, protocol: UDP}]\n"),
        "spec.ingress[0].toPorts[0].ports[0].endPort",
        "89",
        "must not be below port 90",
    );
}

#[test]
fn rejects_end_port_without_numeric_port() {
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - ports: [{endPort: 90}]\n"),
        "spec.ingress[0].ports[0].endPort",
        "90",
        "requires a numeric port",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - ports: [{port: http, endPort: 90}]\n"),
        "spec.ingress[0].ports[0].endPort",
        "90",
        "requires a numeric port",
    );
    assert_rejected(
        &sinew("  endpointSelector: {}\n  egress:\n  - toPorts:\n    - ports: [{endPort: 90}]\n"),
        "spec.egress[0].toPorts[0].ports[0].endPort",
        "90",
        "requires a numeric port",
    );
}

#[test]
fn rejects_bad_port_names() {
    // Kubernetes reads a quoted number as a port name, which needs a letter.
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - ports: [{port: \"80\"}]\n"),
        "spec.ingress[0].ports[0].port",
        "80",
        "port name",
    );
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: Web_Port}]\n"),
        "spec.ingress[0].toPorts[0].ports[0].port",
        "Web_Port",
        "port name",
    );
}

#[test]
fn rejects_invalid_cidrs() {
    assert_rejected(
        &sinew("  endpointSelector: {}\n  egress:\n  - toCIDR: [10.0.0.0/8, 10.0.0.0/33]\n"),
        "spec.egress[0].toCIDR[1]",
        "10.0.0.0/33",
        "not a CIDR",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: banana}}]\n"),
        "spec.egress[0].to[0].ipBlock.cidr",
        "banana",
        "not a CIDR",
    );
}

#[test]
fn rejects_except_outside_cidr() {
    assert_rejected(
        &k8s("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 192.168.0.0/16]}}]\n"),
        "spec.egress[0].to[0].ipBlock.except[1]",
        "192.168.0.0/16",
        "strict subset of cidr 10.0.0.0/8",
    );
    // Equal to the cidr is not a strict subset.
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - fromCIDRSet: [{cidr: 10.0.0.0/8, except: [10.0.0.0/8]}]\n"),
        "spec.ingress[0].fromCIDRSet[0].except[0]",
        "10.0.0.0/8",
        "strict subset",
    );
}

#[test]
fn rejects_unknown_entity() {
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - fromEntities: [world, internet]\n"),
        "spec.ingress[0].fromEntities[1]",
        "internet",
        "unknown entity",
    );
}

#[test]
fn rejects_unknown_protocol() {
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: 80, protocol: HTTP}]\n"),
        "spec.ingress[0].toPorts[0].ports[0].protocol",
        "HTTP",
        "use TCP, UDP, SCTP, ICMP or ANY",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - ports: [{protocol: ICMP}]\n"),
        "spec.ingress[0].ports[0].protocol",
        "ICMP",
        "use TCP, UDP or SCTP",
    );
}

#[test]
fn rejects_missing_name() {
    for yaml in [
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: a}\nspec: {podSelector: {}}\n",
        "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {}\nspec: {endpointSelector: {}}\n",
    ] {
        assert_rejected(yaml, "metadata.name", "", "missing name");
    }
}

#[test]
fn rejects_malformed_peers_and_icmp() {
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]\n"),
        "spec.ingress[0].from[0]",
        "",
        "cannot be combined",
    );
    assert_rejected(
        &k8s("  podSelector: {}\n  ingress:\n  - from: [{}]\n"),
        "spec.ingress[0].from[0]",
        "",
        "a peer needs podSelector, namespaceSelector or ipBlock",
    );
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - icmps: [{type: 8}, {type: 300}]\n"),
        "spec.ingress[0].toPorts[0].icmps[1].type",
        "300",
        "between 0 and 255",
    );
    assert_rejected(
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: 8, protocol: ICMP}]\n"),
        "spec.ingress[0].toPorts[0].ports[0].port",
        "8",
        "list ICMP types under icmps",
    );
}

#[test]
fn rejects_resource_level_mistakes() {
    assert_rejected(
        "apiVersion: sinew.io/v1alpha1\nkind: SinewClusterwideNetworkPolicy\nmetadata: {name: c, namespace: a}\nspec: {endpointSelector: {}}\n",
        "metadata.namespace",
        "a",
        "cluster-scoped",
    );
    assert_rejected(
        "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: c}\nspec: {}\n",
        "apiVersion",
        "networking.k8s.io/v1beta1",
        "use networking.k8s.io/v1",
    );
    assert_rejected(
        "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: c}\nspec: {ingress: []}\n",
        "spec",
        "endpointSelector",
        "missing field",
    );
    let dup = format!("{}---\n{}", k8s("  podSelector: {}\n"), k8s("  podSelector: {}\n"));
    assert_rejected(&dup, "metadata.name", "p", "defined twice");
    let e = reject("kind: [unclosed\n");
    assert!(e.reason.starts_with("not valid YAML"), "{e}");
}

#[test]
fn all_errors_of_a_document_are_reported() {
    let errors = parse(
        "t",
        &sinew("  endpointSelector: {}\n  ingress:\n  - fromEntities: [moon]\n    fromCIDR: [nope]\n    toPorts:\n    - ports: [{port: 0}]\n"),
    )
    .unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "spec.ingress[0].fromEntities[0]",
            "spec.ingress[0].fromCIDR[0]",
            "spec.ingress[0].toPorts[0].ports[0].port"
        ]
    );
}

#[test]
fn sinew_port_accepts_numbers_and_numeric_strings_and_any_protocol() {
    let p = parse(
        "t",
        &sinew("  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: 80}, {port: \"443\", protocol: TCP}, {port: http}]\n      icmps: [{type: 8}]\n"),
    )
    .unwrap();
    assert_eq!(
        p[0].sections[0].1[0].port_rules[0].ports,
        vec![
            PortSel::Range {
                proto: None,
                range: Some((80, 80))
            },
            PortSel::Range {
                proto: Some(Proto::Tcp),
                range: Some((443, 443))
            },
            PortSel::Named {
                proto: None,
                name: "http".into()
            },
            PortSel::Range {
                proto: Some(Proto::Icmp),
                range: Some((8, 8))
            },
        ]
    );
}
