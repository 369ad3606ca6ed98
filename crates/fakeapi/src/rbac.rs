//! Whether the RBAC in deploy/rbac.yaml allows a recorded request
//! (<https://kubernetes.io/docs/reference/access-authn-authz/rbac/>: a
//! request is allowed when any rule of a bound role matches its API group,
//! resource, verb and, when the rule lists names, its object's name).

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde::Deserialize;
use serde_json::Value;

use crate::Seen;

/// The rules of the ClusterRole or Role `name` in a multi-document YAML.
pub fn rules(yaml: &str, kind: &str, name: &str) -> anyhow::Result<Vec<PolicyRule>> {
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(d)?;
        if v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name) {
            return Ok(serde_json::from_value(v["rules"].clone())?);
        }
    }
    anyhow::bail!("no {kind} {name} in the RBAC manifests")
}

/// Whether any of `rules` allows `s`.
pub fn allows(rules: &[PolicyRule], s: &Seen) -> bool {
    let has = |l: &Option<Vec<String>>, v: &str| l.as_ref().is_some_and(|l| l.iter().any(|x| x == v || x == "*"));
    rules.iter().any(|r| {
        has(&r.api_groups, &s.group)
            && has(&r.resources, &s.resource)
            && r.verbs.iter().any(|v| v == &s.verb || v == "*")
            && match &r.resource_names {
                None => true,
                Some(names) => s.name.as_ref().is_some_and(|n| names.contains(n)),
            }
    })
}

/// The requests of `seen` that `rules` do not allow (empty: all allowed).
pub fn denied(rules: &[PolicyRule], seen: &[Seen]) -> Vec<Seen> {
    seen.iter().filter(|s| !allows(rules, s)).cloned().collect()
}
