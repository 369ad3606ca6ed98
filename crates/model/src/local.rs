//! The `local` backend: a directory tree of YAML manifests (any depth,
//! `*.yaml` / `*.yml`, several documents per file), re-read whenever a file
//! is added, changed or removed. Changes are found by polling the tree's
//! (path, size, mtime) every `interval`: cheap for the tens of files a lab
//! holds, and it also sees edits made through bind mounts where inotify
//! would not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::{
    Datastore, DatastoreError, PolicyDoc, PublishedEndpoint, Snapshot, FIRST_LOCAL_IDENTITY, FIRST_POD_IDENTITY,
};

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("datastore directory {path} cannot be read: {source}; create it or pass --datastore")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct LocalDatastore {
    dir: PathBuf,
    rx: watch::Receiver<Arc<Snapshot>>,
    inner: Arc<Watcher>,
    identities: std::sync::Mutex<IdentityCache>,
}

/// The identities of each file under `identities/`, parsed once and reused
/// while the file's (size, mtime) stay the same: allocation reads the
/// directory under the lock every time, and parsing every file again made
/// each new pod's allocation grow with the number of identities (3.6 ms at
/// 200).
type IdentityCache = BTreeMap<PathBuf, (u64, SystemTime, Vec<(u32, BTreeMap<String, String>)>)>;

/// What the polling thread and [`Datastore::refresh`] share.
struct Watcher {
    dir: PathBuf,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Last fingerprint and generation published, and the change held back.
    last: std::sync::Mutex<Published>,
}

/// How long a background poll holds back a change that makes a file invalid
/// while the tree keeps changing (see [`Watcher::poll`]).
const SETTLE_MAX: Duration = Duration::from_secs(1);

struct Published {
    fingerprint: Option<Fingerprint>,
    generation: u64,
    /// A tree that read with a new error, held back: the fingerprint it had
    /// and when the first such read was.
    pending: Option<(Option<Fingerprint>, std::time::Instant)>,
}

impl Watcher {
    /// Publishes a new snapshot if the tree changed since the last one.
    ///
    /// A file written in place (`open(O_TRUNC)` then `write`) can be read
    /// between the two, empty or half written. What it held stays in force
    /// either way, but reporting that passing state would log a warning and
    /// count a rejected update for a file nobody broke. So a background poll
    /// (`settle`) that reads a new error holds the change back until the tree
    /// reads the same on the next poll, or for at most [`SETTLE_MAX`] while
    /// it keeps changing. A change without new errors is published at once,
    /// and [`Datastore::refresh`] (the agent after its own writes) never
    /// waits.
    fn poll(&self, settle: bool) {
        let Ok(mut last) = self.last.lock() else { return };
        let now = fingerprint(&self.dir).ok();
        if now == last.fingerprint {
            last.pending = None;
            return;
        }
        let previous = self.tx.borrow().clone();
        match read_dir_snapshot_after(&self.dir, last.generation + 1, Some(&previous)) {
            Ok(mut s) => {
                if settle && s.error_changes(&previous).files > 0 {
                    match &last.pending {
                        Some((fp, since)) if *fp != now && since.elapsed() < SETTLE_MAX => {
                            let since = *since;
                            last.pending = Some((now, since));
                            return;
                        }
                        None => {
                            last.pending = Some((now, std::time::Instant::now()));
                            return;
                        }
                        Some(_) => {}
                    }
                }
                s.rejected_updates = previous.rejected_updates + log_error_changes(&s, &previous);
                last.fingerprint = now;
                last.generation += 1;
                last.pending = None;
                let _ = self.tx.send(Arc::new(s));
            }
            Err(e) => tracing::warn!(error = %e, "datastore unreadable; keeping the last state"),
        }
    }
}

/// Logs what changed in the invalid documents since `previous`, once: an
/// unchanged invalid file is not reported again on every reload. Returns
/// how many files became invalid or changed their error.
fn log_error_changes(now: &Snapshot, previous: &Snapshot) -> u64 {
    let changes = now.error_changes(previous);
    for e in &changes.new {
        match now.kept.get(e.file()) {
            Some(kinds) => {
                let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
                tracing::warn!(error = %e, kept = %kinds.join(","), "invalid update of a datastore file; what it held stays in force until the file is fixed or removed");
            }
            None => tracing::warn!(error = %e, "invalid datastore document; not applied"),
        }
    }
    for file in &changes.cleared {
        tracing::info!(%file, "datastore file valid again (or removed); applied");
    }
    changes.files
}

type Fingerprint = Vec<(PathBuf, u64, SystemTime)>;

fn scan(dir: &Path, out: &mut Fingerprint) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            scan(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push((path, meta.len(), meta.modified()?));
        }
    }
    Ok(())
}

fn fingerprint(dir: &Path) -> std::io::Result<Fingerprint> {
    let mut fp = Vec::new();
    scan(dir, &mut fp)?;
    fp.sort();
    Ok(fp)
}

/// Reads the whole tree into a snapshot. A file that vanishes between the
/// scan and the read is simply absent.
pub fn read_dir_snapshot(dir: &Path, generation: u64) -> Result<Snapshot, LocalError> {
    read_dir_snapshot_after(dir, generation, None)
}

/// [`read_dir_snapshot`] after `previous` was published: see
/// [`Snapshot::from_documents_after`].
pub fn read_dir_snapshot_after(
    dir: &Path,
    generation: u64,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, LocalError> {
    let fp = fingerprint(dir).map_err(|source| LocalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    // A file that vanished since the scan was removed: what it held goes.
    // One that cannot be read is an invalid update: what it held stays.
    let texts: Vec<(String, Result<String, String>)> = fp
        .iter()
        .filter_map(|(p, _, _)| match std::fs::read_to_string(p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            r => Some((p.display().to_string(), r.map_err(|e| e.to_string()))),
        })
        .collect();
    let mut snap = Snapshot::from_files_after(
        texts
            .iter()
            .map(|(s, t)| (s.clone(), t.as_deref().map_err(String::clone))),
        previous,
    );
    snap.generation = generation;
    // The cluster's IPsec keys: a refused update keeps the keys in force
    // (like any other invalid file), and says why.
    let keys_file = dir.join(crate::ipsec::KEYS_FILE).display().to_string();
    if let Some((file, text)) = texts.iter().find(|(s, _)| *s == keys_file) {
        snap.read_ipsec_keys(file, text.as_deref().map_err(String::clone), previous);
    }
    Ok(snap)
}

impl LocalDatastore {
    /// Reads the directory once (failing if it cannot) and keeps watching it
    /// from a background thread for as long as the datastore lives.
    pub fn start(dir: impl Into<PathBuf>, interval: Duration) -> Result<Self, LocalError> {
        Self::start_after(dir, interval, None)
    }

    /// [`LocalDatastore::start`] for a reader that had `previous` in force
    /// before it restarted: a file invalid now keeps what it held there.
    pub fn start_after(
        dir: impl Into<PathBuf>,
        interval: Duration,
        previous: Option<&Snapshot>,
    ) -> Result<Self, LocalError> {
        let dir = dir.into();
        // Fingerprint before reading, so a change made while we read is seen.
        let mut last = fingerprint(&dir).ok();
        let mut first = read_dir_snapshot_after(&dir, 1, previous)?;
        first.rejected_updates = log_error_changes(&first, &Snapshot::default());
        let (tx, rx) = watch::channel(Arc::new(first));
        let inner = Arc::new(Watcher {
            dir: dir.clone(),
            tx,
            last: std::sync::Mutex::new(Published {
                fingerprint: last.take(),
                generation: 1,
                pending: None,
            }),
        });
        let watcher = inner.clone();
        std::thread::Builder::new()
            .name("datastore-local".into())
            .spawn(move || {
                while !watcher.tx.is_closed() {
                    std::thread::sleep(interval);
                    watcher.poll(true);
                }
            })
            .map_err(|source| LocalError::Dir {
                path: dir.clone(),
                source,
            })?;
        Ok(Self {
            dir,
            rx,
            inner,
            identities: Default::default(),
        })
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DatastoreError + '_ {
    move |source| DatastoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// [`crate::write_atomic`] with the path in the error.
fn write_atomic(path: &Path, text: &str) -> Result<(), DatastoreError> {
    crate::write_atomic(path, text.as_bytes()).map_err(io(path))
}

fn yaml_labels(labels: &BTreeMap<String, String>, indent: &str) -> String {
    if labels.is_empty() {
        return " {}\n".into();
    }
    let mut out = String::from("\n");
    for (k, v) in labels {
        // JSON strings are valid YAML scalars and quote everything safely.
        out.push_str(&format!(
            "{indent}{}: {}\n",
            serde_json::Value::from(k.as_str()),
            serde_json::Value::from(v.as_str())
        ));
    }
    out
}

impl LocalDatastore {
    fn identity_dir(&self) -> PathBuf {
        self.dir.join("identities")
    }

    /// Holds the cluster-wide identity lock (an flock on a file in the
    /// datastore) for the life of the guard: agents in other processes
    /// allocating at the same moment wait for it.
    fn identity_lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, DatastoreError> {
        let path = self.dir.join(".identity.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| DatastoreError::Io {
            path,
            source: std::io::Error::from(e),
        })
    }

    /// The identities on disk now (not the last snapshot: another agent may
    /// have just written one).
    fn read_identities(&self) -> BTreeMap<u32, (BTreeMap<String, String>, PathBuf)> {
        let files = fingerprint(&self.identity_dir()).unwrap_or_default();
        let mut cache = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|path, _| files.binary_search_by(|(p, _, _)| p.cmp(path)).is_ok());
        let mut out = BTreeMap::new();
        for (path, len, mtime) in files {
            let entry = cache
                .entry(path.clone())
                .or_insert_with(|| (0, SystemTime::UNIX_EPOCH, Vec::new()));
            if (entry.0, entry.1) != (len, mtime) {
                // A file that vanished since the scan holds nothing.
                let ids = std::fs::read_to_string(&path)
                    .map(|text| {
                        Snapshot::from_documents_after([(path.display().to_string(), text.as_str())], None)
                            .identities
                            .into_values()
                            .map(|i| (i.id, i.labels))
                            .collect()
                    })
                    .unwrap_or_default();
                *entry = (len, mtime, ids);
            }
            for (id, labels) in &entry.2 {
                out.entry(*id).or_insert_with(|| (labels.clone(), path.clone()));
            }
        }
        out
    }
}

impl Datastore for LocalDatastore {
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }

    fn refresh(&self) {
        self.inner.poll(false);
    }

    fn allocate_identity(&self, labels: &BTreeMap<String, String>) -> Result<u32, DatastoreError> {
        let _lock = self.identity_lock()?;
        let existing = self.read_identities();
        if let Some((id, (_, path))) = existing.iter().find(|(_, (l, _))| l == labels) {
            // Reuse refreshes the file's age so GC does not take it now.
            let f = std::fs::File::options().append(true).open(path).map_err(io(path))?;
            f.set_modified(SystemTime::now()).map_err(io(path))?;
            return Ok(*id);
        }
        let id = existing
            .keys()
            .next_back()
            .map_or(FIRST_POD_IDENTITY, |m| m + 1)
            .max(FIRST_POD_IDENTITY);
        if id >= FIRST_LOCAL_IDENTITY {
            return Err(DatastoreError::IdentitiesExhausted(id - 1));
        }
        let text = format!(
            "apiVersion: sinew.io/v1alpha1\nkind: SinewIdentity\nmetadata:\n  name: \"{id}\"\nspec:\n  securityLabels:{}",
            yaml_labels(labels, "    ")
        );
        write_atomic(&self.identity_dir().join(format!("{id}.yaml")), &text)?;
        Ok(id)
    }

    fn publish_endpoints(&self, node: &str, endpoints: &[PublishedEndpoint]) -> Result<(), DatastoreError> {
        let mut text = String::new();
        for ep in endpoints {
            let ports: BTreeMap<String, serde_json::Value> = ep
                .named_ports
                .iter()
                .map(|(n, (p, port))| (n.clone(), serde_json::json!({"protocol": p, "port": port})))
                .collect();
            text.push_str(&format!(
                "---\napiVersion: sinew.io/v1alpha1\nkind: SinewEndpoint\nmetadata:\n  name: {}\n  namespace: {}\nstatus:\n  node: {}\n  ipv4: {}\n  identity: {}\n  namedPorts: {}\n",
                serde_json::Value::from(ep.name.as_str()),
                serde_json::Value::from(ep.namespace.as_str()),
                serde_json::Value::from(node),
                ep.ipv4,
                ep.identity,
                serde_json::to_string(&ports).expect("json"),
            ));
        }
        let path = self.dir.join("endpoints").join(format!("{node}.yaml"));
        if endpoints.is_empty() {
            // An empty file is an invalid update (what it held would stay):
            // only removing the file removes its endpoints.
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
                _ => Ok(()),
            };
        }
        write_atomic(&path, &text)
    }

    fn publish_node_key(&self, node: &str, wireguard_public_key: &str) -> Result<(), DatastoreError> {
        let text = format!(
            "apiVersion: sinew.io/v1alpha1\nkind: SinewNode\nmetadata:\n  name: {}\nstatus:\n  wireguardPublicKey: {}\n",
            serde_json::Value::from(node),
            serde_json::Value::from(wireguard_public_key),
        );
        let path = self.dir.join("sinewnodes").join(format!("{node}.yaml"));
        write_atomic(&path, &text)
    }

    fn publish_node_ipsec(&self, node: &str, epoch: u64, spis: &[u32]) -> Result<(), DatastoreError> {
        let spis: Vec<String> = spis.iter().map(|s| s.to_string()).collect();
        let text = format!(
            "apiVersion: sinew.io/v1alpha1\nkind: SinewNode\nmetadata:\n  name: {}\nstatus:\n  ipsecEpoch: {epoch}\n  ipsecSpis: [{}]\n",
            serde_json::Value::from(node),
            spis.join(", "),
        );
        let path = self.dir.join("sinewnodes").join(format!("{node}.yaml"));
        write_atomic(&path, &text)
    }

    fn gc_identities(&self, in_use: &BTreeSet<u32>, grace: Duration) -> Result<Vec<u32>, DatastoreError> {
        let _lock = self.identity_lock()?;
        let mut removed = Vec::new();
        for (id, (_, path)) in self.read_identities() {
            if in_use.contains(&id) {
                continue;
            }
            let age = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a >= grace) {
                std::fs::remove_file(&path).map_err(io(&path))?;
                removed.push(id);
            }
        }
        Ok(removed)
    }

    fn apply_policy(&self, doc: &PolicyDoc) -> Result<(), DatastoreError> {
        write_atomic(
            &policy_path(&self.dir, &doc.kind, doc.namespace.as_deref(), &doc.name),
            &doc.yaml,
        )
    }

    fn delete_policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<bool, DatastoreError> {
        let path = policy_path(&self.dir, kind, namespace, name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn stored_policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Result<Option<String>, DatastoreError> {
        let path = policy_path(&self.dir, kind, namespace, name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

/// Where `sinew policy apply` keeps a policy in the local backend.
pub fn policy_path(dir: &Path, kind: &str, namespace: Option<&str>, name: &str) -> PathBuf {
    dir.join("policies").join(format!(
        "{}-{}-{name}.yaml",
        kind.to_lowercase(),
        namespace.unwrap_or("_cluster")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, i: u8) -> String {
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: 10.244.{i}.0/24}}\nstatus: {{addresses: [{{type: InternalIP, address: 172.30.0.{i}}}]}}\n")
    }

    #[tokio::test]
    async fn sees_files_added_changed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("nodes")).unwrap();
        std::fs::write(dir.path().join("nodes/n1.yaml"), node("n1", 1)).unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_millis(20)).unwrap();
        let mut rx = ds.subscribe();
        assert_eq!(rx.borrow().nodes.len(), 1);

        std::fs::write(dir.path().join("nodes/n2.yaml"), node("n2", 2)).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.nodes.len() == 2))
            .await
            .is_ok();
        assert!(r, "{:?}", rx.borrow());

        std::fs::remove_file(dir.path().join("nodes/n1.yaml")).unwrap();
        let s = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.nodes.len() == 1))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(s.nodes.contains_key("n2"));
        assert!(ds.describe().starts_with("local:"));
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = LocalDatastore::start("/nonexistent/sinew-ds", Duration::from_millis(10))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/sinew-ds") && e.to_string().contains("--datastore"));
    }
}

#[cfg(test)]
mod write_tests {
    use super::*;

    fn labels(i: usize) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app".to_string(), format!("a{i}")),
            ("sinew.io/namespace".to_string(), "default".to_string()),
        ])
    }

    /// Two datastores on one directory stand for two agents: the flock makes
    /// concurrent allocation of the same label sets give one id each.
    #[test]
    fn concurrent_allocation_by_two_agents_gives_one_id_per_label_set() {
        let dir = tempfile::tempdir().unwrap();
        let a = Arc::new(LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap());
        let b = Arc::new(LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap());
        let results: Vec<Vec<(usize, u32)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..6)
                .map(|t| {
                    let ds = if t % 2 == 0 { a.clone() } else { b.clone() };
                    s.spawn(move || {
                        (0..30)
                            .map(|i| (i, ds.allocate_identity(&labels(i)).unwrap()))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut by_label: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
        for (i, id) in results.into_iter().flatten() {
            by_label.entry(i).or_default().insert(id);
        }
        assert!(by_label.values().all(|ids| ids.len() == 1), "{by_label:?}");
        let ids: BTreeSet<u32> = by_label.values().flatten().copied().collect();
        assert_eq!(ids.len(), 30, "distinct label sets get distinct ids");
        assert!(ids.iter().all(|id| *id >= FIRST_POD_IDENTITY));
        let snap = read_dir_snapshot(dir.path(), 0).unwrap();
        assert_eq!(snap.identities.len(), 30);
        assert_eq!(
            snap.identities[&a.allocate_identity(&labels(3)).unwrap()].labels,
            labels(3)
        );
    }

    /// Allocation reuses what it parsed, but never past a change on disk:
    /// an identity file replaced with other labels is read again.
    #[test]
    fn allocation_sees_an_identity_file_replaced_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap();
        let first = ds.allocate_identity(&labels(1)).unwrap();
        assert_eq!(ds.allocate_identity(&labels(1)).unwrap(), first, "reused");
        let path = dir.path().join("identities").join(format!("{first}.yaml"));
        let text = std::fs::read_to_string(&path).unwrap().replace("\"a1\"", "\"a22\"");
        std::fs::remove_file(&path).unwrap();
        write_atomic(&path, &text).unwrap();
        assert_eq!(
            ds.allocate_identity(&labels(22)).unwrap(),
            first,
            "the file's new labels"
        );
        let again = ds.allocate_identity(&labels(1)).unwrap();
        assert_ne!(again, first, "the old labels are gone from disk: a new identity");
    }

    #[test]
    fn gc_removes_only_unused_identities_past_grace() {
        let dir = tempfile::tempdir().unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap();
        let used = ds.allocate_identity(&labels(1)).unwrap();
        let unused = ds.allocate_identity(&labels(2)).unwrap();
        let in_use = BTreeSet::from([used]);
        assert!(
            ds.gc_identities(&in_use, Duration::from_secs(3600)).unwrap().is_empty(),
            "grace protects new ones"
        );
        assert_eq!(ds.gc_identities(&in_use, Duration::ZERO).unwrap(), vec![unused]);
        let snap = read_dir_snapshot(dir.path(), 0).unwrap();
        assert_eq!(snap.identities.keys().copied().collect::<Vec<_>>(), vec![used]);
        // A new label set never takes a live id.
        assert!(ds.allocate_identity(&labels(3)).unwrap() > used);
    }

    #[test]
    fn ipsec_node_state_and_cluster_keys_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap();
        ds.publish_node_ipsec("node1", 42, &[256, 300]).unwrap();
        let snap = read_dir_snapshot(dir.path(), 0).unwrap();
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        let k = &snap.node_keys["node1"];
        assert_eq!((k.ipsec_epoch, k.ipsec_spis.clone()), (42, vec![256, 300]));
        assert_eq!(k.wireguard_public_key, "");
        assert_eq!(snap.ipsec_keys, None, "no key file: no keys");
        for (status, field, says) in [
            ("ipsecEpoch: 0", "status.ipsecEpoch", "positive"),
            ("ipsecEpoch: x", "status.ipsecEpoch", "positive"),
            ("ipsecEpoch: 1\n  ipsecSpis: [5]", "status.ipsecSpis", "reserved"),
            ("ipsecEpoch: 1\n  ipsecSpis: 300", "status.ipsecSpis", "not a list"),
        ] {
            std::fs::write(
                dir.path().join("sinewnodes/node2.yaml"),
                format!(
                    "apiVersion: sinew.io/v1alpha1\nkind: SinewNode\nmetadata:\n  name: node2\nstatus:\n  {status}\n"
                ),
            )
            .unwrap();
            let snap = read_dir_snapshot(dir.path(), 0).unwrap();
            assert!(!snap.node_keys.contains_key("node2"), "{status}");
            let e = snap.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
            assert!(e.contains(field) && e.contains(says), "{status}: {e}");
        }
        std::fs::remove_file(dir.path().join("sinewnodes/node2.yaml")).unwrap();

        // The cluster keys: read, and a bad update keeps the ones in force.
        let keys = crate::ipsec::IpsecKeys {
            keys: vec![crate::ipsec::IpsecKey {
                spi: 256,
                key: vec![1; 36],
            }],
        };
        std::fs::write(
            dir.path().join(crate::ipsec::KEYS_FILE),
            crate::ipsec::render_keys(&keys),
        )
        .unwrap();
        let good = read_dir_snapshot(dir.path(), 0).unwrap();
        assert!(good.errors.is_empty(), "{:?}", good.errors);
        assert_eq!(good.ipsec_keys.as_ref(), Some(&keys));
        let bad = crate::ipsec::render_keys(&keys).replace("spi: 256", "spi: 7");
        std::fs::write(dir.path().join(crate::ipsec::KEYS_FILE), bad).unwrap();
        let snap = read_dir_snapshot_after(dir.path(), 0, Some(&good)).unwrap();
        assert_eq!(snap.ipsec_keys.as_ref(), Some(&keys), "kept in force");
        let e = snap.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
        assert!(e.contains("spec.keys[0].spi") && e.contains("7 is reserved"), "{e}");
        assert_eq!(snap.errors[0].kind(), Some("SinewIPsecKeys"));
    }

    #[test]
    fn node_keys_round_trip_and_bad_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap();
        let key = "ZmFrZSBrZXkgb2YgZXhhY3RseSAzMiBieXRlcyEhISE=";
        ds.publish_node_key("node1", key).unwrap();
        let snap = read_dir_snapshot(dir.path(), 0).unwrap();
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        assert_eq!(snap.node_keys["node1"].wireguard_public_key, key);
        // As the operator creates it, before the agent publishes a key.
        std::fs::write(
            dir.path().join("sinewnodes/node3.yaml"),
            "apiVersion: sinew.io/v1alpha1\nkind: SinewNode\nmetadata:\n  name: node3\nspec:\n  podCIDRs: [10.0.3.0/24]\n",
        )
        .unwrap();
        let snap = read_dir_snapshot(dir.path(), 0).unwrap();
        assert!(
            snap.errors.is_empty() && !snap.node_keys.contains_key("node3"),
            "{:?}",
            snap.errors
        );

        for (bad, says) in [("AAAA", "3 bytes"), ("not*base64", "not base64")] {
            ds.publish_node_key("node2", bad).unwrap();
            let snap = read_dir_snapshot(dir.path(), 0).unwrap();
            assert!(!snap.node_keys.contains_key("node2"));
            let e = snap.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
            assert!(e.contains("wireguardPublicKey") && e.contains(says), "{e}");
        }
    }

    #[test]
    fn published_endpoints_and_policies_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_millis(50)).unwrap();
        let ep = PublishedEndpoint {
            namespace: "prod".into(),
            name: "web-1".into(),
            node: "node1".into(),
            ipv4: "10.244.1.7".parse().unwrap(),
            identity: 300,
            named_ports: BTreeMap::from([("http".to_string(), ("TCP".to_string(), 8080))]),
            source: String::new(),
        };
        ds.publish_endpoints("node1", std::slice::from_ref(&ep)).unwrap();
        let doc = PolicyDoc {
            kind: "NetworkPolicy".into(),
            namespace: Some("prod".into()),
            name: "deny".into(),
            source: String::new(),
            yaml: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {}}\n".into(),
        };
        ds.apply_policy(&doc).unwrap();
        let snap = read_dir_snapshot(dir.path(), 0).unwrap();
        assert!(snap.errors.is_empty(), "{:?}", snap.errors);
        let got = &snap.endpoints[0];
        assert_eq!(
            (got.ipv4, got.identity, &got.named_ports),
            (ep.ipv4, 300, &ep.named_ports)
        );
        assert_eq!(snap.policies[0].name, "deny");
        assert_eq!(
            ds.stored_policy("NetworkPolicy", Some("prod"), "deny")
                .unwrap()
                .as_deref(),
            Some(doc.yaml.as_str()),
            "what was written reads back, for a rollback"
        );
        assert!(ds.delete_policy("NetworkPolicy", Some("prod"), "deny").unwrap());
        assert!(!ds.delete_policy("NetworkPolicy", Some("prod"), "deny").unwrap());
        assert_eq!(ds.stored_policy("NetworkPolicy", Some("prod"), "deny").unwrap(), None);
    }
}

#[cfg(test)]
mod in_place_tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}\n";

    /// A file truncated in place (`cat > f`, `open(f, 'w')`) is read while
    /// empty: the service it held must stay until the file is removed.
    #[test]
    fn a_file_truncated_in_place_keeps_its_service_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.yaml");
        std::fs::write(&path, SERVICE).unwrap();
        // Polls only when asked (refresh), so the test sees every state.
        let ds = LocalDatastore::start(dir.path(), Duration::from_secs(3600)).unwrap();
        let rx = ds.subscribe();
        assert_eq!(rx.borrow().services.len(), 1);
        // Truncated, as the writer's open(O_TRUNC) leaves it before write().
        std::fs::File::create(&path).unwrap();
        ds.refresh();
        assert_eq!(rx.borrow().services.len(), 1, "{:?}", rx.borrow().errors);
        // Half written.
        std::fs::write(&path, &SERVICE[..SERVICE.len() - 20]).unwrap();
        ds.refresh();
        assert_eq!(rx.borrow().services.len(), 1, "{:?}", rx.borrow().errors);
        // Written: the new version applies.
        std::fs::write(&path, SERVICE.replace("port: 80,", "port: 81,")).unwrap();
        ds.refresh();
        let port = rx.borrow().services.values().next().map(|s| s.ports[0].port);
        assert_eq!(port, Some(81));
        assert!(rx.borrow().errors.is_empty());
        std::fs::remove_file(&path).unwrap();
        ds.refresh();
        assert!(rx.borrow().services.is_empty(), "removing the file removes the service");
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";

    fn snap(files: &[(&str, &str)], previous: Option<&Snapshot>) -> Snapshot {
        Snapshot::from_documents_after(files.iter().map(|(f, t)| (f.to_string(), *t)), previous)
    }

    /// Each invalid file is reported when it becomes invalid and when its
    /// error changes, not again on reloads caused by other files.
    #[test]
    fn an_invalid_file_is_reported_once_per_change() {
        let ok = snap(&[("ns.yaml", NS)], None);
        let broken = snap(&[("ns.yaml", "kind: [")], Some(&ok));
        let c = broken.error_changes(&ok);
        assert_eq!((c.new.len(), c.files), (1, 1));
        assert_eq!(log_error_changes(&broken, &ok), 1);
        // Another file changes: nothing new to report about ns.yaml.
        let reload = snap(
            &[
                ("ns.yaml", "kind: ["),
                ("other.yaml", NS.replace("name: a", "name: b").as_str()),
            ],
            Some(&broken),
        );
        let c = reload.error_changes(&broken);
        assert!(c.new.is_empty() && c.cleared.is_empty() && c.files == 0, "{c:?}");
        // A different error is a change.
        let other = snap(&[("ns.yaml", "")], Some(&reload));
        assert_eq!(other.error_changes(&reload).files, 1);
        assert!(other.errors[0].to_string().contains("empty"), "{:?}", other.errors);
        // Fixed: cleared once.
        let fixed = snap(&[("ns.yaml", NS)], Some(&other));
        let c = fixed.error_changes(&other);
        assert_eq!(c.cleared, vec!["ns.yaml".to_string()]);
        assert_eq!(c.files, 0);
    }

    #[test]
    fn invalid_documents_count_by_the_kind_they_hold() {
        let ok = snap(&[("ns.yaml", NS)], None);
        let broken = snap(&[("ns.yaml", "kind: ["), ("new.yaml", "kind: [")], Some(&ok));
        assert_eq!(
            broken.invalid_by_kind(),
            BTreeMap::from([("Namespace".to_string(), 1), ("unknown".to_string(), 1)])
        );
        assert!(broken.namespaces.contains_key("a"), "kept in force");
    }

    /// The rejected-updates count grows once per change of an invalid file.
    #[test]
    fn the_backend_counts_rejected_updates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns.yaml");
        std::fs::write(&path, NS).unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_secs(3600)).unwrap();
        let rx = ds.subscribe();
        std::fs::write(&path, "kind: [").unwrap();
        ds.refresh();
        std::fs::write(dir.path().join("b.yaml"), NS.replace("name: a", "name: b")).unwrap();
        ds.refresh();
        assert_eq!(rx.borrow().rejected_updates, 1);
        std::fs::write(&path, "").unwrap();
        ds.refresh();
        assert_eq!(rx.borrow().rejected_updates, 2);
        assert!(rx.borrow().namespaces.contains_key("a"));
    }

    /// A background poll that reads a file mid-write (truncated, then
    /// written invalid) reports the error once, for what the file holds
    /// when it stops changing, not for the empty file it passed through.
    #[test]
    fn a_background_poll_reports_an_invalid_file_once_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ns.yaml");
        std::fs::write(&path, NS).unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_secs(3600)).unwrap();
        let rx = ds.subscribe();
        // Read between open(O_TRUNC) and write(): held back.
        std::fs::File::create(&path).unwrap();
        ds.inner.poll(true);
        assert!(rx.borrow().errors.is_empty(), "an empty read is held back");
        assert_eq!(rx.borrow().rejected_updates, 0);
        // Written: still changing, still held back.
        std::fs::write(&path, "kind: [").unwrap();
        ds.inner.poll(true);
        assert!(rx.borrow().errors.is_empty());
        // The same on the next poll: reported, once, with its real error.
        ds.inner.poll(true);
        assert_eq!(rx.borrow().rejected_updates, 1);
        assert_eq!(rx.borrow().errors.len(), 1);
        assert!(
            !rx.borrow().errors[0].to_string().contains("empty"),
            "{:?}",
            rx.borrow().errors
        );
        assert!(rx.borrow().namespaces.contains_key("a"), "kept in force throughout");
        ds.inner.poll(true);
        assert_eq!(rx.borrow().rejected_updates, 1, "not again while unchanged");
        // A valid change is published at once.
        std::fs::write(dir.path().join("b.yaml"), NS.replace("name: a", "name: b")).unwrap();
        ds.inner.poll(true);
        assert!(rx.borrow().namespaces.contains_key("b"));
        // A file that never stops changing is reported after SETTLE_MAX.
        std::fs::write(&path, "kind: [[").unwrap();
        ds.inner.poll(true);
        let start = std::time::Instant::now();
        let mut n = 0;
        while rx.borrow().rejected_updates == 1 {
            assert!(start.elapsed() < SETTLE_MAX * 3, "never reported");
            n += 1;
            std::fs::write(&path, format!("kind: [[{}", "x".repeat(n))).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            ds.inner.poll(true);
        }
        assert!(start.elapsed() >= SETTLE_MAX - Duration::from_millis(100));
    }

    /// A node without endpoints has no endpoints file (an empty one would
    /// keep the endpoints it held).
    #[test]
    fn publishing_no_endpoints_removes_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ds = LocalDatastore::start(dir.path(), Duration::from_secs(3600)).unwrap();
        let ep = PublishedEndpoint {
            namespace: "prod".into(),
            name: "web-1".into(),
            node: "node1".into(),
            ipv4: "10.244.1.7".parse().unwrap(),
            identity: 300,
            named_ports: BTreeMap::new(),
            source: String::new(),
        };
        ds.publish_endpoints("node1", &[ep]).unwrap();
        ds.refresh();
        assert_eq!(ds.subscribe().borrow().endpoints.len(), 1);
        ds.publish_endpoints("node1", &[]).unwrap();
        ds.publish_endpoints("node1", &[]).unwrap();
        ds.refresh();
        assert!(ds.subscribe().borrow().endpoints.is_empty());
        assert!(ds.subscribe().borrow().errors.is_empty());
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;

    const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: prod}\nspec: {podSelector: {}, ingress: [{ports: [{port: 80}]}]}\n";

    /// A reader that restarts while a policy file is invalid keeps the
    /// version it had in force (handed back to it), not nothing.
    #[test]
    fn a_restart_keeps_the_policy_in_force_of_an_invalid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, POLICY).unwrap();
        let in_force = {
            let ds = LocalDatastore::start(dir.path(), Duration::from_secs(3600)).unwrap();
            let json = serde_json::to_string(&ds.subscribe().borrow().policies).unwrap();
            json
        };
        std::fs::write(&path, POLICY.replace("port: 80", "port: 70000")).unwrap();
        let fresh = LocalDatastore::start(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(
            fresh.subscribe().borrow().policies.is_empty(),
            "nothing to keep without the previous state"
        );
        let previous = Snapshot {
            policies: serde_json::from_str(&in_force).unwrap(),
            ..Default::default()
        };
        let ds = LocalDatastore::start_after(dir.path(), Duration::from_secs(3600), Some(&previous)).unwrap();
        let snap = ds.subscribe().borrow().clone();
        assert_eq!(snap.policies, previous.policies);
        assert!(
            snap.errors.iter().any(|e| e.to_string().contains("70000")),
            "{:?}",
            snap.errors
        );
        // Fixed, or removed, the previous version no longer matters.
        std::fs::remove_file(&path).unwrap();
        let ds = LocalDatastore::start_after(dir.path(), Duration::from_secs(3600), Some(&previous)).unwrap();
        assert!(ds.subscribe().borrow().policies.is_empty());
    }
}
