//! The policy crate reads Sinew's kinds through the shared CRD types
//! (sinew-crd): a document read into the typed resource and written back
//! parses to the same policy as the document itself, for every Sinew
//! policy in the examples and the fuzz corpus (the lab's among them).

use std::path::PathBuf;

use serde::Deserialize;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn round_trip(doc: &serde_yaml::Value) -> String {
    match doc.get("kind").and_then(|k| k.as_str()) {
        Some("SinewNetworkPolicy") => {
            let typed: sinew_crd::SinewNetworkPolicy = serde_yaml::from_value(doc.clone()).unwrap();
            serde_yaml::to_string(&typed).unwrap()
        }
        Some("SinewClusterwideNetworkPolicy") => {
            let typed: sinew_crd::SinewClusterwideNetworkPolicy = serde_yaml::from_value(doc.clone()).unwrap();
            serde_yaml::to_string(&typed).unwrap()
        }
        other => panic!("not a Sinew policy: {other:?}"),
    }
}

#[test]
fn typed_round_trip_parses_to_the_same_policy() {
    let mut n = 0;
    for dir in ["examples", "fuzz/corpus/policy"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(d).unwrap();
                if v.get("apiVersion").and_then(|a| a.as_str()) != Some(sinew_crd::API_VERSION) {
                    continue;
                }
                let original = serde_yaml::to_string(&v).unwrap();
                let want = sinew_policy::parse("doc", &original).unwrap();
                let got = sinew_policy::parse("doc", &round_trip(&v)).unwrap();
                assert_eq!(got, want, "{}: the typed round trip changed the policy", path.display());
                n += 1;
            }
        }
    }
    assert!(n >= 3, "only {n} Sinew policies found");
}

/// The typed resources refuse what the policy crate refuses at the serde
/// level: unknown fields anywhere in the spec.
#[test]
fn typed_resources_reject_unknown_fields() {
    let yaml = "apiVersion: sinew.io/v1alpha1\nkind: SinewNetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  endpointSelector: {}\n  ingress: [{fromEndpoint: [{}]}]\n";
    let typed: Result<sinew_crd::SinewNetworkPolicy, _> = serde_yaml::from_str(yaml);
    assert!(typed.unwrap_err().to_string().contains("fromEndpoint"));
    let errs = sinew_policy::parse("doc", yaml).unwrap_err();
    assert!(errs[0].to_string().contains("fromEndpoint"), "{errs:?}");
}
