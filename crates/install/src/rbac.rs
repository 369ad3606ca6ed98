//! ServiceAccounts, least-privilege roles and their bindings. The rules are
//! also what the operator's tests check every request it makes against.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::{value, Settings};

pub const AGENT: &str = "sinew-agent";
pub const OPERATOR: &str = "sinew-operator";

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(groups)),
        resources: Some(v(resources)),
        verbs: v(verbs),
        ..Default::default()
    }
}

const READ: &[&str] = &["get", "list", "watch"];

/// The agent watches the cluster's desired state (list and watch, no
/// get), creates identities (and reads back one whose create conflicted;
/// it never deletes them: GC is the operator's), server-side applies and
/// deletes its endpoints, and patches its endpoints' and node's status:
/// exactly the requests of crates/kubestore, which its tests check.
pub fn agent_rules() -> Vec<PolicyRule> {
    const WATCH: &[&str] = &["list", "watch"];
    vec![
        rule(&[""], &["pods", "namespaces", "nodes", "services"], WATCH),
        rule(&["discovery.k8s.io"], &["endpointslices"], WATCH),
        rule(&["networking.k8s.io"], &["networkpolicies"], WATCH),
        rule(
            &["sinew.io"],
            &[
                "sinewnetworkpolicies",
                "sinewclusterwidenetworkpolicies",
                "sinewnodes",
                "sinewidentities",
                "sinewendpoints",
            ],
            WATCH,
        ),
        rule(&["sinew.io"], &["sinewidentities"], &["get", "create"]),
        rule(&["sinew.io"], &["sinewendpoints"], &["patch", "delete"]),
        rule(
            &["sinew.io"],
            &["sinewendpoints/status", "sinewnodes/status"],
            &["patch"],
        ),
    ]
}

/// The Role an agent with `--encryption ipsec` needs on top of
/// [`agent_rules`], in the agents' namespace: reading the one Secret with
/// the cluster's IPsec keys. `get`, `list` and `watch` restricted by name:
/// the agent lists and watches it with a `metadata.name` field selector,
/// which the API server authorizes as a request for that name (Kubernetes
/// 1.11 and later), so no other Secret of the namespace is readable.
pub fn agent_ipsec_rules() -> Vec<PolicyRule> {
    let mut r = rule(&[""], &["secrets"], READ);
    r.resource_names = Some(vec![IPSEC_KEYS_SECRET.to_string()]);
    vec![r]
}

/// The Secret with the cluster's IPsec keys (data key `ipsec-keys.yaml`,
/// the `SinewIPsecKeys` document the local datastore keeps in that file).
pub const IPSEC_KEYS_SECRET: &str = "sinew-ipsec-keys";
/// The Role and RoleBinding that let the agent read it.
pub const AGENT_IPSEC_ROLE: &str = "sinew-agent-ipsec-keys";

/// The operator reads Nodes, Pods and Namespaces, owns SinewNodes, and
/// deletes unused identities.
pub fn operator_rules() -> Vec<PolicyRule> {
    vec![
        rule(&[""], &["nodes"], READ),
        rule(&[""], &["pods", "namespaces"], &["list", "watch"]),
        rule(
            &["sinew.io"],
            &["sinewnodes"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule(&["sinew.io"], &["sinewnodes/status"], &["patch"]),
        rule(&["sinew.io"], &["sinewidentities"], &["list", "watch", "delete"]),
        rule(&["sinew.io"], &["sinewendpoints"], &["list", "watch"]),
    ]
}

/// The leader election Lease, in the operator's namespace only; `get` and
/// `update` only of the operator's own Lease.
pub fn operator_lease_rules() -> Vec<PolicyRule> {
    let mut named = rule(&["coordination.k8s.io"], &["leases"], &["get", "update"]);
    named.resource_names = Some(vec![OPERATOR.to_string()]);
    vec![named, rule(&["coordination.k8s.io"], &["leases"], &["create"])]
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_string),
        labels: Some([("app.kubernetes.io/part-of".to_string(), "sinew".to_string())].into()),
        ..Default::default()
    }
}

fn subject(name: &str, s: &Settings) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: name.into(),
        namespace: Some(s.namespace.clone()),
        ..Default::default()
    }
}

pub(crate) fn objects(s: &Settings) -> Vec<serde_json::Value> {
    let ns = Some(s.namespace.as_str());
    let mut out = Vec::new();
    for sa in [AGENT, OPERATOR] {
        out.push(value(&ServiceAccount {
            metadata: meta(sa, ns),
            // Only the agent and operator talk to the API, and they read
            // their token themselves.
            automount_service_account_token: Some(true),
            ..Default::default()
        }));
    }
    for (name, rules) in [(AGENT, agent_rules()), (OPERATOR, operator_rules())] {
        out.push(value(&ClusterRole {
            metadata: meta(name, None),
            rules: Some(rules),
            ..Default::default()
        }));
        out.push(value(&ClusterRoleBinding {
            metadata: meta(name, None),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: name.into(),
            },
            subjects: Some(vec![subject(name, s)]),
        }));
    }
    if s.encryption == crate::Encryption::Ipsec {
        out.push(value(&Role {
            metadata: meta(AGENT_IPSEC_ROLE, ns),
            rules: Some(agent_ipsec_rules()),
        }));
        out.push(value(&RoleBinding {
            metadata: meta(AGENT_IPSEC_ROLE, ns),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: AGENT_IPSEC_ROLE.into(),
            },
            subjects: Some(vec![subject(AGENT, s)]),
        }));
    }
    out.push(value(&Role {
        metadata: meta("sinew-operator-lease", ns),
        rules: Some(operator_lease_rules()),
    }));
    out.push(value(&RoleBinding {
        metadata: meta("sinew-operator-lease", ns),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "sinew-operator-lease".into(),
        },
        subjects: Some(vec![subject(OPERATOR, s)]),
    }));
    out
}
