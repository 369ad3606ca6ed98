//! IPsec on the kubernetes backend, against the in-process API server with
//! deploy/'s CRDs: the cluster keys come from the Secret the agent is
//! given and read exactly as the local backend reads `ipsec-keys.yaml`
//! (a rotation shows up, a refused update keeps the keys in force, a
//! deleted Secret removes them); the node's epoch and SPIs round-trip
//! through the SinewNode status by server-side apply, and the CRD's schema
//! refuses what the model refuses; every request is one the RBAC of
//! `sinew install --encryption ipsec` allows, and the Secret only because
//! of its Role.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use sinew_fakeapi::{rbac, FakeApi};
use sinew_kubestore::{KubeDatastore, KubeView, Options, SecretRef, Source};
use sinew_model::ipsec::{render_keys, IpsecKey, IpsecKeys, KEYS_FILE, MAX_EPOCH};
use sinew_model::local::{read_dir_snapshot, LocalDatastore};
use sinew_model::{Datastore, DatastoreError, Snapshot};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const SECRETS: &str = "/api/v1/namespaces/kube-system/secrets";
const NODES: &str = "/apis/sinew.io/v1alpha1/sinewnodes";

async fn fake() -> FakeApi {
    let fake = FakeApi::start().await.unwrap();
    fake.install_crds(&std::fs::read_to_string(format!("{ROOT}/deploy/crds/sinew.io.yaml")).unwrap())
        .unwrap();
    for (name, i) in [("a", 1), ("b", 2)] {
        fake.put(
            "/api/v1/nodes",
            json!({"metadata": {"name": name}, "spec": {"podCIDR": format!("10.1.{i}.0/24")},
                   "status": {"addresses": [{"type": "InternalIP", "address": format!("192.168.0.{i}")}]}}),
        );
        // As the operator creates them.
        fake.put(
            NODES,
            json!({"metadata": {"name": name}, "spec": {"podCIDRs": [format!("10.1.{i}.0/24")]}}),
        );
    }
    // Another Secret of the namespace, which the agent must not read.
    fake.put(SECRETS, json!({"metadata": {"name": "other"}, "data": {"x": "eHg="}}));
    fake
}

fn keys(spis: &[u32]) -> IpsecKeys {
    IpsecKeys {
        keys: spis
            .iter()
            .map(|&spi| IpsecKey {
                spi,
                key: vec![spi as u8; 36],
            })
            .collect(),
    }
}

/// The Secret as `kubectl create secret generic --from-file=ipsec-keys.yaml`
/// makes it.
fn put_secret(fake: &FakeApi, document: &str) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(document);
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "sinew-ipsec-keys"}, "type": "Opaque", "data": {KEYS_FILE: b64}}),
    );
}

/// What the local backend reads from the same document.
fn local_keys(dir: &std::path::Path, document: &str, previous: Option<&Snapshot>) -> Snapshot {
    std::fs::write(dir.join(KEYS_FILE), document).unwrap();
    sinew_model::local::read_dir_snapshot_after(dir, 0, previous).unwrap()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting until {what}");
}

fn errors(s: &Snapshot) -> String {
    s.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipsec_keys_come_from_the_secret_and_the_node_state_round_trips() {
    let fake = fake().await;
    let one = keys(&[256]);
    put_secret(&fake, &render_keys(&one));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, fake.kubeconfig()).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let options = Options {
        ipsec_keys: Some(SecretRef::parse("kube-system/sinew-ipsec-keys").unwrap()),
    };
    let ds = Arc::new(
        KubeDatastore::start(
            Source::Kubeconfig(kubeconfig),
            "a",
            None,
            Duration::from_secs(2),
            options,
        )
        .unwrap(),
    );
    let rx = ds.subscribe();
    until("the keys arrive", || rx.borrow().ipsec_keys.is_some()).await;
    let local = local_keys(local_dir.path(), &render_keys(&one), None);
    assert_eq!(
        rx.borrow().ipsec_keys,
        local.ipsec_keys,
        "as the local backend reads them"
    );
    assert_eq!(rx.borrow().ipsec_keys.as_ref(), Some(&one));
    assert!(rx.borrow().errors.is_empty(), "{}", errors(&rx.borrow()));

    // A rotation: a second key added to the Secret.
    let two = keys(&[256, 257]);
    put_secret(&fake, &render_keys(&two));
    until("the new key shows up", || rx.borrow().ipsec_keys.as_ref() == Some(&two)).await;
    let local = local_keys(local_dir.path(), &render_keys(&two), Some(&local));
    assert_eq!(rx.borrow().ipsec_keys, local.ipsec_keys);

    // A refused update keeps the keys in force and says why, as the local
    // backend does.
    let bad = render_keys(&two).replace("spi: 257", "spi: 7");
    put_secret(&fake, &bad);
    until("the refusal is reported", || !rx.borrow().errors.is_empty()).await;
    let local = local_keys(local_dir.path(), &bad, Some(&local));
    {
        let s = rx.borrow();
        assert_eq!(s.ipsec_keys.as_ref(), Some(&two), "kept in force");
        assert_eq!(s.ipsec_keys, local.ipsec_keys);
        let e = errors(&s);
        assert!(
            e.contains("spec.keys[1].spi") && e.contains("7 is reserved") && e.contains("sinew-ipsec-keys"),
            "{e}"
        );
        assert_eq!(s.errors[0].kind(), Some("SinewIPsecKeys"));
        assert_eq!(
            errors(&local).replace(&local_dir.path().join(KEYS_FILE).display().to_string(), "F"),
            e.replace(
                "kubernetes:Secret/kube-system/sinew-ipsec-keys data.ipsec-keys.yaml",
                "F"
            ),
            "the same message but for the source"
        );
        assert!(s.rejected_updates >= 1);
    }
    // A Secret without the data key: the same.
    fake.put(
        SECRETS,
        json!({"metadata": {"name": "sinew-ipsec-keys"}, "data": {"keys": "eHg="}}),
    );
    until("the missing data key is reported", || {
        errors(&rx.borrow()).contains("data.ipsec-keys.yaml: missing")
    })
    .await;
    assert_eq!(rx.borrow().ipsec_keys.as_ref(), Some(&two));
    assert!(errors(&rx.borrow()).contains("kubectl -n kube-system create secret generic sinew-ipsec-keys"));
    put_secret(&fake, &render_keys(&two));
    until("valid again", || rx.borrow().errors.is_empty()).await;

    // This node's epoch and SPIs, published as the agent does (the trait,
    // off the async threads), land in the SinewNode status.
    let d = ds.clone();
    tokio::task::spawn_blocking(move || d.publish_node_ipsec("a", MAX_EPOCH, &[256, 257]).unwrap())
        .await
        .unwrap();
    until("the IPsec status is read back", || {
        rx.borrow()
            .node_keys
            .get("a")
            .is_some_and(|k| k.ipsec_epoch == MAX_EPOCH && k.ipsec_spis == [256, 257])
    })
    .await;
    let stored = fake
        .objects(NODES)
        .into_iter()
        .find(|o| o["metadata"]["name"] == "a")
        .unwrap();
    assert_eq!(stored["status"]["ipsecEpoch"], json!(i64::MAX), "{stored}");
    assert_eq!(stored["status"]["ipsecSpis"], json!([256, 257]));
    assert_eq!(
        stored["spec"]["podCIDRs"][0], "10.1.1.0/24",
        "the operator's spec stays"
    );
    let managers: Vec<&Value> = stored["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["manager"])
        .collect();
    assert!(managers.contains(&&json!("sinew-agent")), "{managers:?}");
    // The same as the local backend's SinewNode after the same write.
    let lds = LocalDatastore::start(local_dir.path(), Duration::from_secs(3600)).unwrap();
    lds.publish_node_ipsec("a", MAX_EPOCH, &[256, 257]).unwrap();
    let l = read_dir_snapshot(local_dir.path(), 0).unwrap();
    let pick = |s: &Snapshot| {
        let k = &s.node_keys["a"];
        (k.ipsec_epoch, k.ipsec_spis.clone(), k.wireguard_public_key.clone())
    };
    assert_eq!(pick(&rx.borrow()), pick(&l));

    // The CRD's schema refuses what the model would not read, with the
    // API's message (the view's own write, which the trait's background
    // writer would log and drop).
    let client = kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap();
    let view = KubeView::start(client, "b");
    until("b listed", || view.snapshot().generation > 0).await;
    match view.publish_node_ipsec("b", 5, &[255]).await {
        Err(DatastoreError::Rejected { message, .. }) => {
            assert!(
                message.contains("status.ipsecSpis[0]") && message.contains("256"),
                "{message}"
            )
        }
        other => panic!("SPI 255: expected Rejected, got {other:?}"),
    }
    match view.publish_node_ipsec("b", MAX_EPOCH + 1, &[256]).await {
        Err(DatastoreError::Rejected { message, .. }) => assert!(message.contains("2^63"), "{message}"),
        other => panic!("epoch 2^63: expected Rejected, got {other:?}"),
    }
    view.publish_node_ipsec("b", 9, &[256]).await.unwrap();
    assert_eq!(view.snapshot().node_keys["b"].ipsec_epoch, 9, "read-your-writes");
    drop(view);

    // The Secret deleted: no keys (traffic to other nodes is dropped), as
    // when the local file is removed.
    fake.remove(SECRETS, "sinew-ipsec-keys");
    until("the keys are gone", || rx.borrow().ipsec_keys.is_none()).await;
    std::fs::remove_file(local_dir.path().join(KEYS_FILE)).unwrap();
    assert_eq!(read_dir_snapshot(local_dir.path(), 0).unwrap().ipsec_keys, None);

    // Every request is allowed by the RBAC `sinew install --encryption
    // ipsec` renders; the Secret's only by the Role that names it.
    let settings = sinew_install::Settings {
        encryption: sinew_install::Encryption::Ipsec,
        ..Default::default()
    };
    let yaml = sinew_install::render(&settings).unwrap();
    let cluster = rbac::rules(&yaml, "ClusterRole", "sinew-agent").unwrap();
    let role = rbac::rules(&yaml, "Role", "sinew-agent-ipsec-keys").unwrap();
    let both: Vec<_> = cluster.iter().chain(&role).cloned().collect();
    let seen = fake.requests();
    let secrets: Vec<_> = seen.iter().filter(|s| s.resource == "secrets").collect();
    assert!(
        secrets.iter().any(|s| s.verb == "list") && secrets.iter().any(|s| s.verb == "watch"),
        "{secrets:?}"
    );
    for s in &secrets {
        assert_eq!(
            (s.namespace.as_deref(), s.name.as_deref()),
            (Some("kube-system"), Some("sinew-ipsec-keys")),
            "only the one Secret, in the Role's namespace: {s:?}"
        );
    }
    assert_eq!(rbac::denied(&both, &seen), []);
    assert!(
        !rbac::denied(&cluster, &seen).is_empty(),
        "the ClusterRole alone does not allow the Secret"
    );
    drop(ds);
}
