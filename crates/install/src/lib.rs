//! Sinew's Kubernetes manifests, built as typed k8s-openapi objects from a
//! cluster's [`Settings`]: `sinew install --print` renders them, and
//! `deploy/` holds them rendered with the defaults (a test fails when it is
//! stale). No I/O and no client: rendering is a pure function.
#![forbid(unsafe_code)]

pub mod rbac;
mod workloads;

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Serialize;

pub use rbac::{agent_ipsec_rules, agent_rules, operator_lease_rules, operator_rules, IPSEC_KEYS_SECRET};

/// How nodes encrypt pod traffic between them (the agent's `--encryption`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encryption {
    #[default]
    None,
    Wireguard,
    Ipsec,
}

impl Encryption {
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::Wireguard => "wireguard",
            Encryption::Ipsec => "ipsec",
        }
    }
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Encryption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Encryption::None),
            "wireguard" => Ok(Encryption::Wireguard),
            "ipsec" => Ok(Encryption::Ipsec),
            other => Err(format!("unknown encryption {other:?}; use none, wireguard or ipsec")),
        }
    }
}

/// A cluster's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Where the agent and operator run.
    pub namespace: String,
    /// The one image with every binary (Containerfile).
    pub image: String,
    pub encryption: Encryption,
    /// `vxlan` or `native`.
    pub routing: String,
    /// The nodes' uplink device.
    pub uplink: String,
    /// The pod CIDR pool and each node's block size.
    pub pool_v4: IpNet,
    pub node_prefix_v4: u8,
    pub operator_replicas: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            namespace: "kube-system".into(),
            image: "sinew:latest".into(),
            encryption: Encryption::None,
            routing: "vxlan".into(),
            uplink: "eth0".into(),
            pool_v4: "10.244.0.0/16".parse().expect("a literal CIDR"),
            node_prefix_v4: 24,
            operator_replicas: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{name} {value:?}: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl Settings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |name, value: String, reason| Err(SettingsError::Invalid { name, value, reason });
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !dns_label(&self.namespace) {
            return invalid(
                "--namespace",
                self.namespace.clone(),
                "not a namespace name (a DNS label)",
            );
        }
        if self.image.is_empty() || self.image.contains(char::is_whitespace) {
            return invalid("--image", self.image.clone(), "not an image reference");
        }
        if self.routing != "vxlan" && self.routing != "native" {
            return invalid("--routing", self.routing.clone(), "use vxlan or native");
        }
        if self.uplink.is_empty() || self.uplink.len() > 15 || self.uplink.contains('/') {
            return invalid("--uplink", self.uplink.clone(), "not an interface name");
        }
        if !matches!(self.pool_v4, IpNet::V4(_)) {
            return invalid("--pool-v4", self.pool_v4.to_string(), "not an IPv4 prefix");
        }
        if self.node_prefix_v4 <= self.pool_v4.prefix_len() || self.node_prefix_v4 > 30 {
            return invalid(
                "--node-prefix-v4",
                self.node_prefix_v4.to_string(),
                "must be longer than the pool's prefix and at most 30",
            );
        }
        if !(1..=5).contains(&self.operator_replicas) {
            return invalid("--operator-replicas", self.operator_replicas.to_string(), "use 1 to 5");
        }
        Ok(())
    }
}

/// One manifest file of `deploy/`.
pub struct File {
    /// Relative to `deploy/`.
    pub name: &'static str,
    pub documents: Vec<serde_json::Value>,
}

fn value<T: Serialize>(v: &T) -> serde_json::Value {
    // k8s-openapi objects always serialise.
    serde_json::to_value(v).unwrap_or_default()
}

/// Every file, in apply order: CRDs, RBAC, the agent, the operator.
pub fn files(s: &Settings) -> Vec<File> {
    vec![
        File {
            name: "crds/sinew.io.yaml",
            documents: sinew_crd::crds().iter().map(value).collect(),
        },
        File {
            name: "rbac.yaml",
            documents: rbac::objects(s),
        },
        File {
            name: "agent.yaml",
            documents: workloads::agent(s),
        },
        File {
            name: "operator.yaml",
            documents: workloads::operator(s),
        },
    ]
}

/// A file as YAML (the CRD file in exactly the form `sinew-operator crds`
/// prints).
pub fn file_yaml(f: &File) -> String {
    if f.name == "crds/sinew.io.yaml" {
        return sinew_crd::crds_yaml();
    }
    let mut out = String::from(
        "# Generated by `sinew install --print` (crates/install) with the default settings; do not edit.\n",
    );
    for d in &f.documents {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d).unwrap_or_default());
    }
    out
}

/// Everything as one stream, for `sinew install --print | kubectl apply -f -`.
/// With IPsec, a closing comment says how to create the Secret with the
/// cluster keys (the manifests never hold a key: see [`ipsec_keys_secret`]).
pub fn render(s: &Settings) -> Result<String, SettingsError> {
    s.validate()?;
    let mut out = String::new();
    for f in files(s) {
        out.push_str(&format!("# ---- {} ----\n", f.name));
        out.push_str(&file_yaml(&f));
    }
    if s.encryption == Encryption::Ipsec {
        out.push_str(&ipsec_keys_howto(&s.namespace));
    }
    Ok(out)
}

/// How a user creates the Secret the agents read the IPsec keys from.
pub fn ipsec_keys_howto(namespace: &str) -> String {
    let text = r#"# ---- IPsec cluster keys ----
# The agents read the cluster's IPsec keys from the Secret NS/SECRET
# (data key ipsec-keys.yaml: a SinewIPsecKeys document). Until it exists,
# traffic between nodes is dropped, never sent in clear. Create it once,
# with a random key:
#   cat > ipsec-keys.yaml <<EOF
#   apiVersion: sinew.io/v1alpha1
#   kind: SinewIPsecKeys
#   metadata: {name: cluster}
#   spec:
#     keys:
#     - spi: 256
#       key: $(head -c 36 /dev/urandom | base64 -w0)
#   EOF
#   kubectl -n NS create secret generic SECRET --from-file=ipsec-keys.yaml
# or render it with `sinew install --print --encryption ipsec --generate-ipsec-key`
# the first time only: a new list replaces every key at once. Rotate with
# `sinew encryption rotate-ipsec-key --keys-file ipsec-keys.yaml` (it prints
# the kubectl command that puts the file back into the Secret).
"#;
    text.replace("NS", namespace).replace("SECRET", IPSEC_KEYS_SECRET)
}

/// The Secret with the cluster's IPsec keys: `document` is the
/// `SinewIPsecKeys` YAML (made by the caller: rendering has no random
/// source, and manifests never hold a fixed key).
pub fn ipsec_keys_secret(namespace: &str, document: &str) -> serde_json::Value {
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(IPSEC_KEYS_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "sinew".to_string())].into()),
            ..Default::default()
        },
        string_data: Some([("ipsec-keys.yaml".to_string(), document.to_string())].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    value(&secret)
}
