//! A directory of Kubernetes-shaped YAML (the local backend's datastore)
//! mirrored into a [`FakeApi`], as `kubectl apply` of those files would:
//! a new or changed object is stored, one whose file is gone is deleted.
//! The same scenario then drives both backends: the lab writes files, the
//! local backend reads them, the kubernetes backend watches the mirror.
//! Writes through the mirror are the cluster admin's, not recorded as
//! requests. The cluster's IPsec key list (a `SinewIPsecKeys` document,
//! the local backend's `ipsec-keys.yaml`) becomes the Secret
//! [`IPSEC_KEYS_SECRET`], as `kubectl create secret generic
//! --from-file=ipsec-keys.yaml` stores it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::FakeApi;

/// The collection path of an object, e.g. `/api/v1/namespaces/a/pods`;
/// `None` for a kind the fake does not serve.
pub fn collection(api_version: &str, kind: &str, namespace: Option<&str>) -> Option<String> {
    let (resource, namespaced) = match kind {
        "Node" => ("nodes", false),
        "Namespace" => ("namespaces", false),
        "Pod" => ("pods", true),
        "Service" => ("services", true),
        "EndpointSlice" => ("endpointslices", true),
        "NetworkPolicy" => ("networkpolicies", true),
        "SinewNetworkPolicy" => ("sinewnetworkpolicies", true),
        "SinewClusterwideNetworkPolicy" => ("sinewclusterwidenetworkpolicies", false),
        "SinewIdentity" => ("sinewidentities", false),
        "SinewEndpoint" => ("sinewendpoints", true),
        "SinewNode" => ("sinewnodes", false),
        _ => return None,
    };
    let root = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    Some(if namespaced {
        format!("{root}/namespaces/{}/{resource}", namespace.unwrap_or("default"))
    } else {
        format!("{root}/{resource}")
    })
}

/// Where the IPsec key list goes: (namespace, name) of the Secret.
pub const IPSEC_KEYS_SECRET: (&str, &str) = ("kube-system", "sinew-ipsec-keys");

/// The Secret holding a `SinewIPsecKeys` document under `ipsec-keys.yaml`.
fn ipsec_keys_secret(doc: &Value) -> ((String, String), Value) {
    use base64::Engine;
    let (ns, name) = IPSEC_KEYS_SECRET;
    let text = serde_yaml::to_string(doc).unwrap_or_default();
    let data = base64::engine::general_purpose::STANDARD.encode(text);
    (
        (format!("/api/v1/namespaces/{ns}/secrets"), name.to_string()),
        serde_json::json!({"metadata": {"name": name, "namespace": ns}, "type": "Opaque",
                           "data": {"ipsec-keys.yaml": data}}),
    )
}

/// (collection, name) -> the object as last stored.
type Mirrored = BTreeMap<(String, String), Value>;

fn read_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            read_tree(&p, out);
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

/// The objects of every YAML file under `dir` (unreadable or invalid
/// documents are skipped, as the API would refuse them).
fn objects(dir: &Path) -> Mirrored {
    let mut files = Vec::new();
    read_tree(dir, &mut files);
    let mut out = Mirrored::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for d in serde_yaml::Deserializer::from_str(&text) {
            let Ok(v) = Value::deserialize(d) else { break };
            let (Some(api), Some(kind), Some(name)) = (
                v["apiVersion"].as_str(),
                v["kind"].as_str(),
                v["metadata"]["name"].as_str(),
            ) else {
                continue;
            };
            if kind == "SinewIPsecKeys" {
                let (k, secret) = ipsec_keys_secret(&v);
                out.insert(k, secret);
                continue;
            }
            if let Some(c) = collection(api, kind, v["metadata"]["namespace"].as_str()) {
                out.insert((c, name.to_string()), v.clone());
            }
        }
    }
    out
}

/// Mirrors `dir` into the fake every `every` until dropped.
pub struct DirMirror {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// One pass: stores what is new or changed, deletes what is gone.
fn sync(fake: &FakeApi, dir: &Path, mirrored: &mut Mirrored) {
    let now = objects(dir);
    for (k, v) in &now {
        if mirrored.get(k) != Some(v) {
            fake.put(&k.0, v.clone());
        }
    }
    for k in mirrored.keys() {
        if !now.contains_key(k) {
            fake.remove(&k.0, &k.1);
        }
    }
    *mirrored = now;
}

impl DirMirror {
    /// Mirrors once now, then every `every` on a thread.
    pub fn start(fake: Arc<FakeApi>, dir: PathBuf, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut mirrored = Mirrored::new();
        sync(&fake, &dir, &mut mirrored);
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                sync(&fake, &dir, &mut mirrored);
            }
        });
        DirMirror {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DirMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collections_follow_the_api_paths() {
        assert_eq!(collection("v1", "Pod", Some("a")).unwrap(), "/api/v1/namespaces/a/pods");
        assert_eq!(collection("v1", "Node", None).unwrap(), "/api/v1/nodes");
        assert_eq!(
            collection("networking.k8s.io/v1", "NetworkPolicy", None).unwrap(),
            "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
        );
        assert_eq!(
            collection("sinew.io/v1alpha1", "SinewClusterwideNetworkPolicy", Some("x")).unwrap(),
            "/apis/sinew.io/v1alpha1/sinewclusterwidenetworkpolicies"
        );
        assert_eq!(collection("v1", "ConfigMap", Some("a")), None);
    }

    #[tokio::test]
    async fn files_become_objects_and_removed_files_deletions() {
        let fake = Arc::new(FakeApi::start().await.unwrap());
        let dir = std::env::temp_dir().join(format!("fakeapi-mirror-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(
            dir.join("sub/a.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: a\n",
        )
        .unwrap();
        let m = DirMirror::start(fake.clone(), dir.clone(), Duration::from_millis(20));
        assert_eq!(fake.objects("/api/v1/namespaces").len(), 1);
        assert_eq!(fake.objects("/api/v1/namespaces/a/pods").len(), 1);
        let rv = fake.resource_version();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(fake.resource_version(), rv, "an unchanged file is not stored again");
        // The IPsec key list becomes its Secret.
        std::fs::write(
            dir.join("ipsec-keys.yaml"),
            "apiVersion: sinew.io/v1alpha1\nkind: SinewIPsecKeys\nmetadata:\n  name: cluster\nspec:\n  keys: []\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        let secrets = fake.objects("/api/v1/namespaces/kube-system/secrets");
        assert_eq!(secrets.len(), 1);
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD
            .decode(secrets[0]["data"]["ipsec-keys.yaml"].as_str().unwrap())
            .unwrap();
        assert!(String::from_utf8(text).unwrap().contains("kind: SinewIPsecKeys"));
        std::fs::remove_file(dir.join("ipsec-keys.yaml")).unwrap();
        std::fs::remove_file(dir.join("sub/a.yaml")).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert!(fake.objects("/api/v1/namespaces").is_empty());
        drop(m);
        let _ = std::fs::remove_dir_all(dir);
    }
}
