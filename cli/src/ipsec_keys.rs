//! `sinew encryption rotate-ipsec-key` and `retire-ipsec-keys`: change the
//! cluster's IPsec key list (`ipsec-keys.yaml`, the `SinewIPsecKeys`
//! document) where it is a file: the local datastore, or a file exported
//! from the Kubernetes Secret. The CLI has no Kubernetes client, so on
//! Kubernetes it edits the exported file and prints the `kubectl` commands
//! that move it; it never claims to have changed the Secret.
//!
//! How the agents use the list (agent/src/ipsec.rs, `Rotation`): the last
//! key is the newest. Each agent installs it inbound and publishes its SPI;
//! a sender moves a peer to it once that peer lists it. Older keys stay
//! `--ipsec-key-grace` seconds after an agent first sees the newest, then
//! go from the kernel; but while they are still in the list, an agent that
//! restarts keeps them for another grace period. Retiring them from the
//! list ends that, once every node receives with the newest.
//!
//! Every write is atomic and mode 0600; a refused input writes nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use sinew_model::ipsec::{self, IpsecKeys, KEYS_FILE, SECRET_NAME};

/// Where the key list is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A local datastore directory (`DIR/ipsec-keys.yaml`); its SinewNodes
    /// say which SPIs each node receives with.
    Datastore(PathBuf),
    /// A file exported from the Kubernetes Secret.
    File { path: PathBuf, namespace: String },
}

impl Target {
    pub fn path(&self) -> PathBuf {
        match self {
            Target::Datastore(dir) => dir.join(KEYS_FILE),
            Target::File { path, .. } => path.clone(),
        }
    }
}

/// The kubectl commands that export the Secret to `ipsec-keys.yaml`.
pub fn export_howto(namespace: &str) -> String {
    format!(
        "kubectl -n {namespace} get secret {SECRET_NAME} -o jsonpath='{{.data.ipsec-keys\\.yaml}}' | base64 -d > {KEYS_FILE}"
    )
}

/// The kubectl command that puts `path` back into the Secret.
pub fn import_howto(namespace: &str, path: &Path) -> String {
    format!(
        "kubectl -n {namespace} create secret generic {SECRET_NAME} --from-file={KEYS_FILE}={} --dry-run=client -o yaml | kubectl apply -f -",
        path.display()
    )
}

/// What the CLI says when it is not told where the keys are.
pub fn no_target(lab: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "where are the IPsec keys? no lab {lab:?} is up; pass --datastore DIR (the local datastore the agents read, \
         e.g. /etc/sinew/datastore) or --keys-file FILE. On Kubernetes the keys are in the Secret {SECRET_NAME} and \
         this CLI has no Kubernetes client: export it with `{}`, run this command with --keys-file {KEYS_FILE}, \
         and put the file back as it then says",
        export_howto("kube-system")
    )
}

/// Reads and checks the key list; a clear error (and nothing written)
/// when there is none or it is invalid.
fn read(path: &Path) -> anyhow::Result<IpsecKeys> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} does not exist: there are no IPsec keys to rotate. The first key list is made when the cluster is set up \
             (`sinew lab up --encryption ipsec` writes one; on Kubernetes `sinew install --print --encryption ipsec` says how); \
             nothing was written",
            path.display()
        ),
        Err(e) => bail!("cannot read {}: {e}; check its permissions (run as root?); nothing was written", path.display()),
    };
    ipsec::parse_keys(&path.display().to_string(), &text)
        .with_context(|| "the key list is invalid: fix the file (or restore it) first; nothing was written")
}

fn write(path: &Path, keys: &IpsecKeys) -> anyhow::Result<()> {
    sinew_model::write_atomic_private(path, ipsec::render_keys(keys).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn spis(keys: &IpsecKeys) -> String {
    let v: Vec<String> = keys.keys.iter().map(|k| k.spi.to_string()).collect();
    format!("[{}]", v.join(", "))
}

/// Appends a new random key with the next SPI; returns what to tell the
/// user.
pub fn rotate(target: &Target) -> anyhow::Result<String> {
    let path = target.path();
    let keys = read(&path)?;
    let (new, key) = ipsec::with_new_key(&keys).map_err(anyhow::Error::msg)?;
    write(&path, &new)?;
    let mut out = format!(
        "Added IPsec key SPI {} ({}-bit AES-GCM, {} random bytes from the kernel) to {}; the keys are now SPIs {} (newest last).\n",
        key.spi,
        (key.key.len() - 4) * 8,
        key.key.len(),
        path.display(),
        spis(&new)
    );
    if let Target::File { namespace, .. } = target {
        out.push_str(&format!(
            "This file is not the cluster's yet: put it back into the Secret (this CLI has no Kubernetes client):\n  {}\n",
            import_howto(namespace, &path)
        ));
    }
    out.push_str(&format!(
        "What happens next: every agent installs SPI {spi} for receiving and publishes it in its SinewNode; each node sends \
         with it to a peer once that peer lists it (`sinew encryption status`: the out SPI per peer), so no packet waits \
         for a key. Older keys stay in the kernel --ipsec-key-grace (default 60 s) after each agent first sees SPI {spi}, \
         then go. Once every node lists SPI {spi}, remove them from the list too with `sinew encryption retire-ipsec-keys` \
         (while listed, an agent that restarts keeps them for another grace period).\n",
        spi = key.spi
    ));
    Ok(out)
}

/// Keeps only the newest key. With a datastore, only once every node that
/// published IPsec state receives with the newest and the list is older
/// than `grace` (the agents' --ipsec-key-grace); `force` skips both checks
/// (required for a file: the CLI cannot see the cluster's nodes).
pub fn retire(target: &Target, grace: Duration, force: bool) -> anyhow::Result<String> {
    let path = target.path();
    let keys = read(&path)?;
    let newest = keys.newest().expect("a parsed key list is never empty").clone();
    if keys.keys.len() == 1 {
        return Ok(format!(
            "Nothing to retire: {} holds one key (SPI {}); nothing was written.\n",
            path.display(),
            newest.spi
        ));
    }
    if !force {
        match target {
            Target::Datastore(dir) => {
                let snap = sinew_model::local::read_dir_snapshot(dir, 0)
                    .with_context(|| format!("cannot read the datastore {}", dir.display()))?;
                let behind: Vec<String> = snap
                    .node_keys
                    .values()
                    .filter(|k| k.ipsec_epoch != 0 && !k.ipsec_spis.contains(&newest.spi))
                    .map(|k| format!("{} (receives with {:?})", k.node, k.ipsec_spis))
                    .collect();
                if !behind.is_empty() {
                    bail!(
                        "not every node receives with the newest key (SPI {}) yet: {}; their peers still send to them with \
                         an older key, and retiring it now would drop that traffic. Wait until they list it (check their \
                         agents), or pass --force; nothing was written",
                        newest.spi,
                        behind.join(", ")
                    );
                }
                let age = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .unwrap_or_default();
                if age < grace {
                    bail!(
                        "{} was changed {} s ago: agents keep older keys for --ipsec-key-grace ({} s here) after they see \
                         the newest, so that packets in flight with an older key still arrive. Retry in {} s (or pass \
                         --grace with the agents' setting, or --force); nothing was written",
                        path.display(),
                        age.as_secs(),
                        grace.as_secs(),
                        (grace - age).as_secs() + 1
                    );
                }
            }
            Target::File { .. } => bail!(
                "{} is a file exported from the Secret: this CLI cannot see whether every node receives with the newest \
                 key (SPI {}). Check that each node lists it (`kubectl get sinewnodes -o \
                 custom-columns=NODE:.metadata.name,SPIS:.status.ipsecSpis`) and that the grace period has passed, then \
                 pass --force; nothing was written",
                path.display(),
                newest.spi
            ),
        }
    }
    let old: Vec<u32> = keys.keys.iter().map(|k| k.spi).filter(|s| *s != newest.spi).collect();
    let kept = IpsecKeys {
        keys: vec![newest.clone()],
    };
    write(&path, &kept)?;
    let mut out = format!(
        "Retired IPsec keys SPIs {old:?} from {}; SPI {} is the only key now.\n",
        path.display(),
        newest.spi
    );
    if let Target::File { namespace, .. } = target {
        out.push_str(&format!(
            "Put the file back into the Secret (this CLI has no Kubernetes client):\n  {}\n",
            import_howto(namespace, &path)
        ));
    }
    out.push_str("What happens next: every agent removes the SAs of the retired keys at once.\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn keys(spis: &[u32]) -> IpsecKeys {
        IpsecKeys {
            keys: spis
                .iter()
                .map(|&spi| ipsec::IpsecKey { spi, key: vec![1; 36] })
                .collect(),
        }
    }

    fn node(dir: &Path, name: &str, spis: &str) {
        std::fs::create_dir_all(dir.join("sinewnodes")).unwrap();
        std::fs::write(
            dir.join(format!("sinewnodes/{name}.yaml")),
            format!(
                "apiVersion: sinew.io/v1alpha1\nkind: SinewNode\nmetadata:\n  name: {name}\nstatus:\n  ipsecEpoch: 7\n  ipsecSpis: {spis}\n"
            ),
        )
        .unwrap();
    }

    #[test]
    fn rotate_appends_a_random_key_with_the_next_spi_atomically_and_privately() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYS_FILE);
        std::fs::write(&path, ipsec::render_keys(&keys(&[256, 300]))).unwrap();
        let target = Target::Datastore(dir.path().to_path_buf());
        let said = rotate(&target).unwrap();
        let after = ipsec::parse_keys("k", &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(after.keys.iter().map(|k| k.spi).collect::<Vec<_>>(), [256, 300, 301]);
        assert_eq!(
            after.keys[..2],
            keys(&[256, 300]).keys[..],
            "the old keys stay as they were"
        );
        assert_eq!(after.keys[2].key.len(), 36);
        assert_ne!(after.keys[2].key, vec![1; 36]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(said.contains("SPI 301") && said.contains("retire-ipsec-keys"), "{said}");
        assert!(!said.contains("kubectl"), "{said}");
        // No temporary left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Again: another fresh key.
        rotate(&target).unwrap();
        let again = ipsec::parse_keys("k", &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(again.keys[3].spi, 302);
        assert_ne!(again.keys[3].key, again.keys[2].key);
    }

    #[test]
    fn rotate_of_an_exported_file_says_how_to_put_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exported.yaml");
        std::fs::write(&path, ipsec::render_keys(&keys(&[256]))).unwrap();
        let target = Target::File {
            path: path.clone(),
            namespace: "sinew".into(),
        };
        let said = rotate(&target).unwrap();
        assert!(
            said.contains(&format!(
                "kubectl -n sinew create secret generic sinew-ipsec-keys --from-file=ipsec-keys.yaml={}",
                path.display()
            )) && said.contains("no Kubernetes client"),
            "{said}"
        );
    }

    #[test]
    fn bad_input_is_a_clear_error_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::Datastore(dir.path().to_path_buf());
        let e = format!("{:#}", rotate(&target).unwrap_err());
        assert!(e.contains("does not exist") && e.contains("nothing was written"), "{e}");
        assert!(!dir.path().join(KEYS_FILE).exists());

        let path = dir.path().join(KEYS_FILE);
        let bad = ipsec::render_keys(&keys(&[256])).replace("spi: 256", "spi: 9");
        std::fs::write(&path, &bad).unwrap();
        for e in [
            rotate(&target).unwrap_err(),
            retire(&target, Duration::ZERO, true).unwrap_err(),
        ] {
            let e = format!("{e:#}");
            assert!(
                e.contains("invalid") && e.contains("spec.keys[0].spi") && e.contains("nothing was written"),
                "{e}"
            );
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), bad, "untouched");
        std::fs::write(&path, "kind: SinewIPsecKeys\nspec: {keys: []}\n").unwrap();
        let e = format!("{:#}", rotate(&target).unwrap_err());
        assert!(e.contains("empty"), "{e}");

        // The last SPI taken: no next one.
        std::fs::write(&path, ipsec::render_keys(&keys(&[u32::MAX]))).unwrap();
        let e = format!("{:#}", rotate(&target).unwrap_err());
        assert!(e.contains("no SPI is left"), "{e}");
        assert_eq!(ipsec::read_keys(dir.path()).unwrap().unwrap(), keys(&[u32::MAX]));
    }

    #[test]
    fn retire_waits_for_every_node_and_the_grace_then_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEYS_FILE);
        let target = Target::Datastore(dir.path().to_path_buf());
        std::fs::write(&path, ipsec::render_keys(&keys(&[256]))).unwrap();
        assert!(retire(&target, Duration::ZERO, false)
            .unwrap()
            .contains("Nothing to retire"));

        std::fs::write(&path, ipsec::render_keys(&keys(&[256, 257]))).unwrap();
        node(dir.path(), "node1", "[256, 257]");
        node(dir.path(), "node2", "[256]");
        let e = format!("{:#}", retire(&target, Duration::ZERO, false).unwrap_err());
        assert!(
            e.contains("node2") && e.contains("SPI 257") && !e.contains("node1"),
            "{e}"
        );
        node(dir.path(), "node2", "[256, 257]");
        let e = format!("{:#}", retire(&target, Duration::from_secs(3600), false).unwrap_err());
        assert!(
            e.contains("--ipsec-key-grace") && e.contains("nothing was written"),
            "{e}"
        );
        assert_eq!(ipsec::read_keys(dir.path()).unwrap().unwrap().keys.len(), 2);

        let said = retire(&target, Duration::ZERO, false).unwrap();
        assert!(
            said.contains("[256]") && said.contains("SPI 257 is the only key"),
            "{said}"
        );
        assert_eq!(ipsec::read_keys(dir.path()).unwrap().unwrap(), keys(&[257]));
    }

    #[test]
    fn retire_of_an_exported_file_needs_force() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exported.yaml");
        std::fs::write(&path, ipsec::render_keys(&keys(&[256, 257]))).unwrap();
        let target = Target::File {
            path: path.clone(),
            namespace: "kube-system".into(),
        };
        let e = format!("{:#}", retire(&target, Duration::ZERO, false).unwrap_err());
        assert!(e.contains("kubectl get sinewnodes") && e.contains("--force"), "{e}");
        let said = retire(&target, Duration::ZERO, true).unwrap();
        assert!(said.contains("kubectl -n kube-system create secret generic"), "{said}");
        let kept = ipsec::parse_keys("k", &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(kept, keys(&[257]));
    }

    #[test]
    fn without_a_target_the_error_says_what_to_pass_and_that_there_is_no_kube_client() {
        let e = no_target("lab").to_string();
        assert!(
            e.contains("--datastore") && e.contains("--keys-file") && e.contains("no Kubernetes client"),
            "{e}"
        );
        assert!(e.contains("kubectl -n kube-system get secret sinew-ipsec-keys"), "{e}");
    }
}
