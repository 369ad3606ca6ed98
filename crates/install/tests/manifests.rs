//! deploy/ is what the renderer produces, every manifest parses into its
//! k8s-openapi type without losing a field, and the shape rules hold
//! (least privilege, the mounts the agent needs).

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sinew_install::{file_yaml, files, render, Encryption, Settings};

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// `deploy/` must equal the rendering with default settings; regenerate
/// with `SINEW_BLESS=1 cargo test -p sinew-install --test manifests`.
#[test]
fn deploy_is_current() {
    for f in files(&Settings::default()) {
        let path = deploy().join(f.name);
        let want = file_yaml(&f);
        if std::env::var_os("SINEW_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is stale: regenerate deploy/ with SINEW_BLESS=1 cargo test -p sinew-install --test manifests",
            path.display()
        );
    }
}

/// Parses `v` as `T` and checks that nothing was dropped on the way (an
/// unknown or misspelt field would be).
fn typed<T: DeserializeOwned + Serialize>(v: &serde_json::Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(&back, v, "a field did not survive the typed round trip");
    t
}

fn documents(text: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde_json::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_manifest_parses_into_its_type() {
    let mut kinds = Vec::new();
    for f in files(&Settings::default()) {
        let text = std::fs::read_to_string(deploy().join(f.name)).unwrap();
        for d in documents(&text) {
            let kind = d["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(&d)),
                "ServiceAccount" => drop(typed::<ServiceAccount>(&d)),
                "ClusterRole" => drop(typed::<ClusterRole>(&d)),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&d)),
                "Role" => drop(typed::<Role>(&d)),
                "RoleBinding" => drop(typed::<RoleBinding>(&d)),
                "ConfigMap" => drop(typed::<ConfigMap>(&d)),
                "DaemonSet" => drop(typed::<DaemonSet>(&d)),
                "Deployment" => drop(typed::<Deployment>(&d)),
                "PodDisruptionBudget" => drop(typed::<PodDisruptionBudget>(&d)),
                other => panic!("{}: no typed check for kind {other}", f.name),
            }
            kinds.push(kind);
        }
    }
    for k in [
        "DaemonSet",
        "Deployment",
        "PodDisruptionBudget",
        "ClusterRole",
        "ServiceAccount",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in deploy/");
    }
    assert_eq!(kinds.iter().filter(|k| *k == "CustomResourceDefinition").count(), 5);
}

fn agent_ds() -> DaemonSet {
    let text = std::fs::read_to_string(deploy().join("agent.yaml")).unwrap();
    let d = documents(&text).into_iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    typed(&d)
}

#[test]
fn the_agent_is_not_privileged_and_has_its_mounts() {
    let ds = agent_ds();
    let spec = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(spec.host_network, Some(true));
    let agent = &spec.containers[0];
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added = caps.add.clone().unwrap();
    for c in ["NET_ADMIN", "BPF", "PERFMON"] {
        assert!(added.iter().any(|a| a == c), "agent lacks {c}");
    }
    assert!(!added.iter().any(|a| a == "SYS_ADMIN"), "agent has SYS_ADMIN");
    let mounts: Vec<String> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    for m in ["/sys/fs/bpf", "/host/sys/fs/cgroup", "/run/sinew"] {
        assert!(mounts.iter().any(|x| x == m), "agent lacks mount {m}: {mounts:?}");
    }
    // The init containers: only prepare-node is privileged; install-cni
    // writes the plugin and the conflist to the host.
    let inits = spec.init_containers.unwrap();
    for c in &inits {
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged) == Some(true);
        assert_eq!(privileged, c.name == "prepare-node", "{}", c.name);
    }
    let install = inits.iter().find(|c| c.name == "install-cni").unwrap();
    let mounts: Vec<String> = install
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .collect();
    assert!(mounts.contains(&"/host/opt/cni/bin".to_string()) && mounts.contains(&"/host/etc/cni/net.d".to_string()));
}

#[test]
fn settings_reach_the_manifests_and_bad_ones_are_refused() {
    let s = Settings {
        encryption: Encryption::Wireguard,
        image: "registry.example/sinew:v1".into(),
        pool_v4: "10.50.0.0/16".parse().unwrap(),
        ..Settings::default()
    };
    let out = render(&s).unwrap();
    assert!(out.contains("--encryption=wireguard"));
    assert!(out.contains("--pool-v4=10.50.0.0/16"));
    assert!(out.contains("image: registry.example/sinew:v1"));
    assert!(!render(&Settings::default()).unwrap().contains("--encryption="));
    let bad = Settings {
        node_prefix_v4: 8,
        ..Settings::default()
    };
    assert!(render(&bad).unwrap_err().to_string().contains("--node-prefix-v4"));
    assert!("tls"
        .parse::<Encryption>()
        .unwrap_err()
        .contains("none, wireguard or ipsec"));
}

/// `--encryption ipsec`: the agent's flag naming the Secret, a Role that
/// reads only that Secret (bound to the agent), how to create it, and no
/// key anywhere; a Secret is rendered only from a document the caller
/// made.
#[test]
fn ipsec_renders_the_secret_role_the_flag_and_never_a_key() {
    let s = Settings {
        encryption: Encryption::Ipsec,
        namespace: "sinew".into(),
        ..Settings::default()
    };
    let out = render(&s).unwrap();
    assert!(out.contains("--encryption=ipsec"), "{out}");
    assert!(out.contains("--ipsec-keys-secret=sinew/sinew-ipsec-keys"));
    assert!(out.contains("kubectl -n sinew create secret generic sinew-ipsec-keys --from-file=ipsec-keys.yaml"));
    assert!(!out.contains("kind: Secret"), "no Secret, hence no fixed key");
    let docs = documents(&out);
    let role: Role = typed(
        docs.iter()
            .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "sinew-agent-ipsec-keys")
            .unwrap(),
    );
    assert_eq!(role.metadata.namespace.as_deref(), Some("sinew"));
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].resources.as_deref(), Some(&["secrets".to_string()][..]));
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["sinew-ipsec-keys".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
    let binding: RoleBinding = typed(
        docs.iter()
            .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["name"] == "sinew-agent-ipsec-keys")
            .unwrap(),
    );
    assert_eq!(binding.role_ref.name, "sinew-agent-ipsec-keys");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        ("sinew-agent", Some("sinew"))
    );
    // Without IPsec the agent reads no Secret at all.
    let plain = render(&Settings::default()).unwrap();
    assert!(!plain.contains("secrets") && !plain.contains("ipsec-keys"), "{plain}");

    let secret = sinew_install::ipsec_keys_secret("sinew", "kind: SinewIPsecKeys\n");
    let secret: k8s_openapi::api::core::v1::Secret = typed(&secret);
    assert_eq!(secret.metadata.name.as_deref(), Some("sinew-ipsec-keys"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("sinew"));
    assert_eq!(secret.string_data.unwrap()["ipsec-keys.yaml"], "kind: SinewIPsecKeys\n");
}
