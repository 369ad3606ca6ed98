//! The `local` backend: a directory tree of YAML manifests (any depth,
//! `*.yaml` / `*.yml`, several documents per file), re-read whenever a file
//! is added, changed or removed. Changes are found by polling the tree's
//! (path, size, mtime) every `interval`: cheap for the tens of files a lab
//! holds, and it also sees edits made through bind mounts where inotify
//! would not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::{Datastore, Snapshot};

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
    let fp = fingerprint(dir).map_err(|source| LocalError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let texts: Vec<(String, String)> = fp
        .iter()
        .filter_map(|(p, _, _)| std::fs::read_to_string(p).ok().map(|t| (p.display().to_string(), t)))
        .collect();
    let mut snap = Snapshot::from_documents(texts.iter().map(|(s, t)| (s.clone(), t.as_str())));
    snap.generation = generation;
    Ok(snap)
}

impl LocalDatastore {
    /// Reads the directory once (failing if it cannot) and keeps watching it
    /// from a background thread for as long as the datastore lives.
    pub fn start(dir: impl Into<PathBuf>, interval: Duration) -> Result<Self, LocalError> {
        let dir = dir.into();
        // Fingerprint before reading, so a change made while we read is seen.
        let mut last = fingerprint(&dir).ok();
        let first = read_dir_snapshot(&dir, 1)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        let watch_dir = dir.clone();
        std::thread::Builder::new()
            .name("datastore-local".into())
            .spawn(move || {
                let mut generation = 1;
                while !tx.is_closed() {
                    std::thread::sleep(interval);
                    let now = fingerprint(&watch_dir).ok();
                    if now == last {
                        continue;
                    }
                    last = now;
                    generation += 1;
                    match read_dir_snapshot(&watch_dir, generation) {
                        Ok(s) => {
                            for e in &s.errors {
                                tracing::warn!(error = %e, "ignoring invalid resource");
                            }
                            let _ = tx.send(Arc::new(s));
                        }
                        Err(e) => tracing::warn!(error = %e, "datastore unreadable; keeping the last state"),
                    }
                }
            })
            .map_err(|source| LocalError::Dir {
                path: dir.clone(),
                source,
            })?;
        Ok(Self { dir, rx })
    }
}

impl Datastore for LocalDatastore {
    fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }
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
