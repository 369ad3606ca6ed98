//! The generated CRDs: the checked-in copy is current, every schema is
//! structural enough for an API server, and the lab's policy YAML reads
//! into these types.

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `deploy/crds/sinew.io.yaml` must equal what the types generate. Run
/// `SINEW_BLESS=1 cargo test -p sinew-crd --test crds` (or
/// `sinew-operator crds > deploy/crds/sinew.io.yaml`) after changing a type.
#[test]
fn checked_in_crds_are_current() {
    let path = repo().join("deploy/crds/sinew.io.yaml");
    let want = sinew_crd::crds_yaml();
    if std::env::var_os("SINEW_BLESS").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "{} is stale: regenerate it with `sinew-operator crds > deploy/crds/sinew.io.yaml` (or SINEW_BLESS=1 cargo test -p sinew-crd --test crds)",
        path.display()
    );
}

use serde_json::Value;

fn crd_schema(kind: &str) -> Value {
    let crd = sinew_crd::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let v = serde_json::to_value(&crd.spec.versions[0]).unwrap();
    v["schema"]["openAPIV3Schema"].clone()
}

/// The structural-schema rules an API server applies to a CRD: every node
/// has a type (except int-or-string and preserve-unknown-fields nodes), a
/// node inside allOf/anyOf/oneOf sets no type or properties, no `$ref`, no
/// `additionalProperties` beside `properties`.
fn structural(node: &Value, path: &str, inside_junctor: bool, errs: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        errs.push(format!("{path}: not an object"));
        return;
    };
    if obj.contains_key("$ref") {
        errs.push(format!("{path}: $ref"));
    }
    let free = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if inside_junctor {
        for k in [
            "type",
            "properties",
            "items",
            "additionalProperties",
            "nullable",
            "description",
        ] {
            if obj.contains_key(k) {
                errs.push(format!("{path}: {k} inside a junctor"));
            }
        }
    } else if !free && !obj.contains_key("type") {
        errs.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        errs.push(format!("{path}: both properties and additionalProperties"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            structural(v, &format!("{path}.{k}"), false, errs);
        }
    }
    for k in ["items", "additionalProperties"] {
        if let Some(v) = obj.get(k).filter(|v| v.is_object()) {
            structural(v, &format!("{path}[{k}]"), false, errs);
        }
    }
    for j in ["allOf", "anyOf", "oneOf"] {
        for (i, v) in obj.get(j).and_then(Value::as_array).into_iter().flatten().enumerate() {
            structural(v, &format!("{path}.{j}[{i}]"), true, errs);
        }
    }
}

#[test]
fn every_schema_is_structural() {
    let mut errs = Vec::new();
    for crd in sinew_crd::crds() {
        let kind = crd.spec.names.kind.clone();
        structural(&crd_schema(&kind), &kind, false, &mut errs);
    }
    assert!(errs.is_empty(), "not structural:\n{}", errs.join("\n"));
}

/// What an API server checks from the OpenAPI part of a schema (CEL rules
/// are not evaluated here). Unknown fields are errors, as with kubectl's
/// strict field validation.
fn validate(schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let s = |k: &str| schema.get(k);
    if v.is_null() {
        if s("nullable") != Some(&Value::Bool(true)) {
            errs.push(format!("{path}: null"));
        }
        return;
    }
    if s("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) && !(v.is_i64() || v.is_u64() || v.is_string()) {
        errs.push(format!("{path}: neither integer nor string"));
        return;
    }
    for sub in s("allOf").and_then(Value::as_array).into_iter().flatten() {
        validate(sub, v, path, errs);
    }
    if let Some(list) = s("enum").and_then(Value::as_array) {
        if !list.contains(v) {
            errs.push(format!("{path}: {v} not one of {list:?}"));
        }
    }
    let ty = s("type").and_then(Value::as_str);
    match (ty, v) {
        (Some("object"), Value::Object(m)) => {
            for r in s("required").and_then(Value::as_array).into_iter().flatten() {
                if !m.contains_key(r.as_str().unwrap_or_default()) {
                    errs.push(format!("{path}: missing {r}"));
                }
            }
            if let Some(max) = s("maxProperties").and_then(Value::as_u64) {
                if m.len() as u64 > max {
                    errs.push(format!("{path}: more than {max} properties"));
                }
            }
            let props = s("properties").and_then(Value::as_object);
            for (k, val) in m {
                let p = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), s("additionalProperties")) {
                    (Some(sub), _) => validate(sub, val, &p, errs),
                    (None, Some(sub)) if sub.is_object() => validate(sub, val, &p, errs),
                    _ if s("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) => {}
                    _ => errs.push(format!("{p}: unknown field")),
                }
            }
        }
        (Some("array"), Value::Array(a)) => {
            if let Some(max) = s("maxItems").and_then(Value::as_u64) {
                if a.len() as u64 > max {
                    errs.push(format!("{path}: more than {max} items"));
                }
            }
            if let Some(items) = s("items") {
                for (i, val) in a.iter().enumerate() {
                    validate(items, val, &format!("{path}[{i}]"), errs);
                }
            }
        }
        (Some("integer"), Value::Number(n)) if n.is_i64() || n.is_u64() => {}
        (Some("boolean"), Value::Bool(_)) => {}
        (Some("string"), Value::String(_)) => {}
        (None, _) => {}
        (Some(t), _) => errs.push(format!("{path}: {v} is not {t}")),
    }
    if let Some(n) = v.as_f64() {
        if s("minimum").and_then(Value::as_f64).is_some_and(|m| n < m) {
            errs.push(format!("{path}: {n} below minimum"));
        }
        if s("maximum").and_then(Value::as_f64).is_some_and(|m| n > m) {
            errs.push(format!("{path}: {n} above maximum"));
        }
    }
    if let Some(text) = v.as_str() {
        let chars = text.chars().count() as u64;
        if s("maxLength").and_then(Value::as_u64).is_some_and(|m| chars > m) {
            errs.push(format!("{path}: longer than maxLength"));
        }
        if s("minLength").and_then(Value::as_u64).is_some_and(|m| chars < m) {
            errs.push(format!("{path}: shorter than minLength"));
        }
        if let Some(p) = s("pattern").and_then(Value::as_str) {
            if !regex::Regex::new(p).unwrap().is_match(text) {
                errs.push(format!("{path}: {text:?} does not match {p}"));
            }
        }
    }
}

/// Validates one resource (as YAML) against its kind's schema; the errors.
fn check(yaml: &str) -> Vec<String> {
    let v: Value = serde_yaml::from_str(yaml).unwrap();
    let kind = v["kind"].as_str().unwrap().to_string();
    let mut body = v.clone();
    // apiVersion, kind and metadata are the API server's own.
    for k in ["apiVersion", "kind", "metadata"] {
        body.as_object_mut().unwrap().remove(k);
    }
    let mut errs = Vec::new();
    validate(&crd_schema(&kind), &body, &kind, &mut errs);
    errs
}

fn sinew_documents(text: &str) -> Vec<String> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| {
            let v = serde_yaml::Value::deserialize(d).ok()?;
            let api = v.get("apiVersion")?.as_str()?;
            (api == sinew_crd::API_VERSION).then(|| serde_yaml::to_string(&v).unwrap())
        })
        .collect()
}

/// Every Sinew resource in the examples and the fuzz corpus (the lab's
/// policies among them) passes the generated schema.
#[test]
fn example_policies_pass_the_schema() {
    let mut n = 0;
    for dir in ["examples", "fuzz/corpus/policy"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            for doc in sinew_documents(&std::fs::read_to_string(&path).unwrap()) {
                let errs = check(&doc);
                assert!(errs.is_empty(), "{}: {errs:?}\n{doc}", path.display());
                n += 1;
            }
        }
    }
    assert!(n >= 3, "only {n} Sinew documents found");
}

const HEAD: &str = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: p, namespace: a}\n";

#[test]
fn the_schema_rejects_what_it_can_see() {
    let cases = [
        ("port above 65535", "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 70000}]}]}]\n", "above maximum"),
        ("port name with capitals", "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: Http}]}]}]\n", "does not match"),
        ("unknown protocol", "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80, protocol: TCPP}]}]}]\n", "not one of"),
        ("unknown entity", "spec:\n  endpointSelector: {}\n  egress: [{toEntities: [wurld]}]\n", "not one of"),
        ("bad operator", "spec:\n  endpointSelector: {matchExpressions: [{key: app, operator: Inn, values: [a]}]}\n  ingress: []\n", "not one of"),
        ("not a CIDR", "spec:\n  endpointSelector: {}\n  egress: [{toCIDR: [10.0.0.0]}]\n", "does not match"),
        ("ICMP type 300", "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{icmps: [{type: 300}]}]}]\n", "above maximum"),
        ("misspelt field", "spec:\n  endpointSelector: {matchLabel: {app: a}}\n  ingress: []\n", "unknown field"),
        ("no endpointSelector", "spec:\n  ingress: []\n", "missing"),
        ("bad gRPC service", "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: {grpc: [{service: 'a..b'}]}}]}]\n", "does not match"),
        ("header name with a space", "spec:\n  endpointSelector: {}\n  ingress: [{toPorts: [{ports: [{port: 80}], rules: {http: [{headers: [{name: 'x y'}]}]}}]}]\n", "does not match"),
    ];
    for (what, spec, want) in cases {
        let errs = check(&format!("{HEAD}{spec}"));
        assert!(
            errs.iter().any(|e| e.contains(want)),
            "{what}: want an error with {want:?}, got {errs:?}"
        );
    }
    // And the same shapes, valid, pass.
    let ok = "spec:\n  endpointSelector: {matchExpressions: [{key: app, operator: In, values: [a]}]}\n  ingress: [{fromEntities: [world], toPorts: [{ports: [{port: \"8080\", protocol: TCP}, {port: http}, {port: 80, endPort: 90}], rules: {http: [{method: GET, path: {prefix: /api}, headers: [{name: x-id, exact: a}]}]}}]}]\n  egress: [{toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}, {cidr: '2001:db8::/32'}]}]\n";
    assert_eq!(check(&format!("{HEAD}{ok}")), Vec::<String>::new());
}

/// The cross-field rules the schema cannot express as types are CEL rules
/// in the CRD, each with a message that says what to write.
#[test]
fn cross_field_rules_are_cel() {
    let yaml = sinew_crd::crds_yaml();
    for rule in [
        "L7 rules (toPorts[].rules) cannot deny",
        "L7 rules need the TCP ports they apply to",
        "In and NotIn need values",
        "endPort requires a numeric port",
        "give at most one of present, exact or regex",
        "an identity's labels are immutable",
        "a node's pod CIDRs are set once",
    ] {
        assert!(yaml.contains(rule), "no CEL rule saying {rule:?}");
    }
}

/// Typed resources serialise to what the schema accepts.
#[test]
fn typed_resources_pass_the_schema() {
    use std::collections::BTreeMap;
    let id = sinew_crd::SinewIdentity::new(
        "300",
        sinew_crd::SinewIdentitySpec {
            security_labels: BTreeMap::from([
                ("app".into(), "web".into()),
                ("sinew.io/namespace".into(), "prod".into()),
            ]),
        },
    );
    assert_eq!(id.number(), Some(300));
    assert_eq!(check(&serde_yaml::to_string(&id).unwrap()), Vec::<String>::new());
    let mut ep = sinew_crd::SinewEndpoint::new("web", sinew_crd::SinewEndpointSpec {});
    ep.status = Some(sinew_crd::SinewEndpointStatus {
        node: "node1".into(),
        ipv4: "10.244.1.5".into(),
        identity: 300,
        named_ports: BTreeMap::from([(
            "http".into(),
            sinew_crd::NamedPort {
                protocol: "TCP".into(),
                port: 8080,
            },
        )]),
    });
    assert_eq!(check(&serde_yaml::to_string(&ep).unwrap()), Vec::<String>::new());
    let node = sinew_crd::SinewNode::new(
        "node1",
        sinew_crd::SinewNodeSpec {
            pod_cidrs: vec!["10.244.1.0/24".into()],
        },
    );
    assert_eq!(check(&serde_yaml::to_string(&node).unwrap()), Vec::<String>::new());
}

/// The local backend's SinewEndpoint files (status only) read into the
/// typed status.
#[test]
fn local_endpoint_status_reads_into_the_type() {
    let text = "node: node1\nipv4: 10.244.1.5\nidentity: 300\nnamedPorts: {\"http\":{\"port\":8080,\"protocol\":\"TCP\"},\"dns\":{\"port\":53}}\n";
    let st: sinew_crd::SinewEndpointStatus = serde_yaml::from_str(text).unwrap();
    assert_eq!(st.named_ports["dns"].protocol, "TCP");
    assert_eq!(st.named_ports["http"].port, 8080);
}
