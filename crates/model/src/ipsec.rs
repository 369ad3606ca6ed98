//! The cluster's IPsec keys (`--encryption ipsec`): a list of {spi, key}
//! kept in the datastore, the newest last. In the local backend it is one
//! document in `ipsec-keys.yaml` of the datastore directory:
//!
//! ```yaml
//! apiVersion: sinew.io/v1alpha1
//! kind: SinewIPsecKeys
//! metadata:
//!   name: cluster
//! spec:
//!   keys:
//!   - spi: 256
//!     key: <base64 of 20 or 36 bytes: an AES-128 or AES-256 key and a 4-byte salt>
//! ```
//!
//! On the Kubernetes backend the same document is the value of the key
//! `ipsec-keys.yaml` in the Secret [`SECRET_NAME`] (in Sinew's namespace):
//!
//! ```sh
//! kubectl -n kube-system create secret generic sinew-ipsec-keys --from-file=ipsec-keys.yaml
//! ```
//!
//! These are cluster keys: no SA uses one as it is. Each node derives a key
//! per direction and peer from one (see the agent's `ipsec` module), so
//! that no two senders ever share a GCM key and nonce space.
//!
//! Key material is never printed: not by `Debug`, not in an error.

use std::collections::BTreeSet;

/// The file in the local datastore directory.
pub const KEYS_FILE: &str = "ipsec-keys.yaml";
pub const KIND: &str = "SinewIPsecKeys";
/// Key lengths rfc4106(gcm(aes)) takes: the AES key plus a 4-byte salt
/// (RFC 4106 §8.1).
pub const KEY_LENGTHS: [usize; 2] = [20, 36];
/// The Secret that holds the document on the Kubernetes backend, and its
/// data key ([`KEYS_FILE`]).
pub const SECRET_NAME: &str = "sinew-ipsec-keys";
/// The largest epoch a node publishes: Kubernetes keeps integers as int64,
/// so epochs stay below 2^63 on every backend.
pub const MAX_EPOCH: u64 = i64::MAX as u64;
/// SPIs 1 to 255 are reserved by IANA and 0 is never sent (RFC 4303 §2.1).
pub const MIN_SPI: u32 = 256;

/// One cluster key.
#[derive(Clone, PartialEq, Eq)]
pub struct IpsecKey {
    pub spi: u32,
    /// AES key followed by the 4-byte salt (20 or 36 bytes).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for IpsecKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IpsecKey {{ spi: {:#x}, key: <{} bytes> }}",
            self.spi,
            self.key.len()
        )
    }
}

/// Why a key list was refused; `field` names the place
/// (`spec.keys[1].key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct KeyError {
    pub file: String,
    pub field: String,
    pub reason: String,
}

/// The cluster's keys, in the order the document lists them (the last is
/// the newest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpsecKeys {
    pub keys: Vec<IpsecKey>,
}

impl IpsecKeys {
    /// The newest key (the last listed).
    pub fn newest(&self) -> Option<&IpsecKey> {
        self.keys.last()
    }

    /// The key with `spi`; an error that says so when there is none.
    pub fn get(&self, spi: u32) -> Result<&IpsecKey, String> {
        self.keys.iter().find(|k| k.spi == spi).ok_or_else(|| {
            let known: Vec<String> = self.keys.iter().map(|k| k.spi.to_string()).collect();
            format!(
                "unknown SPI {spi}: the cluster's IPsec keys have SPIs [{}]; add the key to {KEYS_FILE} or use one of those",
                known.join(", ")
            )
        })
    }
}

/// Checks one base64 key; the key bytes on success.
pub fn check_key(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
        Ok(b) if KEY_LENGTHS.contains(&b.len()) => Ok(b),
        Ok(b) => Err(format!(
            "decodes to {} bytes; an rfc4106(gcm(aes)) key is 20 bytes (AES-128 + 4-byte salt) or 36 (AES-256 + salt): \
             make one with `head -c 36 /dev/urandom | base64 -w0`",
            b.len()
        )),
        Err(e) => Err(format!(
            "not base64 ({e}); make a key with `head -c 36 /dev/urandom | base64 -w0`"
        )),
    }
}

/// Checks an SPI.
pub fn check_spi(spi: u64) -> Result<u32, String> {
    match u32::try_from(spi) {
        Ok(s) if s >= MIN_SPI => Ok(s),
        Ok(s) => Err(format!(
            "{s} is reserved (RFC 4303 §2.1: 0 is never sent, 1 to 255 are IANA's); use {MIN_SPI} or more"
        )),
        Err(_) => Err(format!("{spi} does not fit in 32 bits; use {MIN_SPI} to 4294967295")),
    }
}

/// Parses the key document of `file` (its text `text`). Every key must be
/// valid and every SPI unique; there must be at least one.
pub fn parse_keys(file: &str, text: &str) -> Result<IpsecKeys, KeyError> {
    let err = |field: &str, reason: String| KeyError {
        file: file.into(),
        field: field.into(),
        reason,
    };
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| err("(document)", format!("not YAML: {e}")))?;
    let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
    if kind != KIND {
        return Err(err("kind", format!("is {kind:?}, expected {KIND:?}")));
    }
    let list = doc
        .get("spec")
        .and_then(|s| s.get("keys"))
        .and_then(|k| k.as_sequence())
        .ok_or_else(|| err("spec.keys", "missing: a list of {spi, key}".into()))?;
    if list.is_empty() {
        return Err(err(
            "spec.keys",
            "empty: IPsec needs at least one key (the agent never sends in clear)".into(),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut keys = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let spi_field = format!("spec.keys[{i}].spi");
        let key_field = format!("spec.keys[{i}].key");
        let spi = match item.get("spi") {
            Some(v) => v
                .as_u64()
                .ok_or_else(|| err(&spi_field, "not a non-negative integer".into()))
                .and_then(|s| check_spi(s).map_err(|r| err(&spi_field, r)))?,
            None => return Err(err(&spi_field, "missing".into())),
        };
        if !seen.insert(spi) {
            return Err(err(
                &spi_field,
                format!("{spi} is listed twice; every key needs its own SPI"),
            ));
        }
        let text = item
            .get("key")
            .and_then(|k| k.as_str())
            .ok_or_else(|| err(&key_field, "missing (a base64 string)".into()))?;
        let key = check_key(text).map_err(|r| err(&key_field, r))?;
        keys.push(IpsecKey { spi, key });
    }
    Ok(IpsecKeys { keys })
}

/// The key document for `keys` (what `sinew lab up --encryption ipsec`
/// writes).
pub fn render_keys(keys: &IpsecKeys) -> String {
    use base64::Engine;
    let mut out = format!("apiVersion: sinew.io/v1alpha1\nkind: {KIND}\nmetadata:\n  name: cluster\nspec:\n  keys:\n");
    for k in &keys.keys {
        out.push_str(&format!(
            "  - spi: {}\n    key: {}\n",
            k.spi,
            base64::engine::general_purpose::STANDARD.encode(&k.key)
        ));
    }
    out
}

/// A fresh random AES-256 key and salt (36 bytes) from the kernel's
/// random source, with `spi`.
pub fn random_key(spi: u32) -> std::io::Result<IpsecKey> {
    use std::io::Read;
    let mut key = vec![0u8; 36];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(IpsecKey { spi, key })
}

/// The SPI a new key gets: one past the largest in use, so that SPIs never
/// repeat while older keys are listed (an SPI reused for another key would
/// let a peer that still holds the old one fail every packet's integrity
/// check). None when the largest is `u32::MAX`.
pub fn next_spi(keys: &IpsecKeys) -> Option<u32> {
    match keys.keys.iter().map(|k| k.spi).max() {
        None => Some(MIN_SPI),
        Some(max) => max.checked_add(1).map(|s| s.max(MIN_SPI)),
    }
}

/// `keys` with a fresh random key appended (the newest); the new key.
pub fn with_new_key(keys: &IpsecKeys) -> Result<(IpsecKeys, IpsecKey), String> {
    let spi = next_spi(keys).ok_or_else(|| {
        format!("no SPI is left above the largest in use ({}); retire the old keys and start again from {MIN_SPI} with a new key list", u32::MAX)
    })?;
    let key = random_key(spi).map_err(|e| format!("cannot read the kernel's random source: {e}"))?;
    let mut out = keys.clone();
    out.keys.push(key.clone());
    Ok((out, key))
}

/// Reads the keys from the local datastore directory `dir`; None when the
/// file does not exist.
pub fn read_keys(dir: &std::path::Path) -> Result<Option<IpsecKeys>, KeyError> {
    let path = dir.join(KEYS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_keys(&path.display().to_string(), &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(KeyError {
            file: path.display().to_string(),
            field: "(file)".into(),
            reason: format!("cannot read it: {e}; check its permissions"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(n: usize) -> String {
        base64::engine::general_purpose::STANDARD.encode(vec![7u8; n])
    }

    fn doc(items: &str) -> String {
        format!(
            "apiVersion: sinew.io/v1alpha1\nkind: SinewIPsecKeys\nmetadata:\n  name: cluster\nspec:\n  keys:\n{items}"
        )
    }

    #[test]
    fn keys_parse_and_render_round_trip() {
        let text = doc(&format!(
            "  - spi: 256\n    key: {}\n  - spi: 4294967295\n    key: {}\n",
            b64(20),
            b64(36)
        ));
        let keys = parse_keys("k.yaml", &text).unwrap();
        assert_eq!(keys.keys.len(), 2);
        assert_eq!((keys.keys[0].spi, keys.keys[0].key.len()), (256, 20));
        assert_eq!(keys.newest().unwrap().spi, u32::MAX);
        assert_eq!(parse_keys("k.yaml", &render_keys(&keys)).unwrap(), keys);
        assert_eq!(keys.get(256).unwrap().key, vec![7; 20]);
        let e = keys.get(300).unwrap_err();
        assert!(e.contains("unknown SPI 300") && e.contains("[256, 4294967295]"), "{e}");
        // Debug never shows the key.
        let shown = format!("{keys:?}");
        assert!(shown.contains("<20 bytes>") && !shown.contains("7, 7"), "{shown}");
    }

    #[test]
    fn bad_key_material_is_refused_naming_the_field() {
        let cases = [
            (
                doc(&format!("  - spi: 256\n    key: {}\n", b64(17))),
                "spec.keys[0].key",
                "decodes to 17 bytes",
            ),
            (
                doc(&format!("  - spi: 256\n    key: {}\n", b64(32))),
                "spec.keys[0].key",
                "decodes to 32 bytes",
            ),
            (
                doc("  - spi: 256\n    key: not*base64\n"),
                "spec.keys[0].key",
                "not base64",
            ),
            (doc("  - spi: 256\n"), "spec.keys[0].key", "missing"),
            (
                doc(&format!("  - spi: 0\n    key: {}\n", b64(20))),
                "spec.keys[0].spi",
                "0 is reserved",
            ),
            (
                doc(&format!("  - spi: 255\n    key: {}\n", b64(20))),
                "spec.keys[0].spi",
                "255 is reserved",
            ),
            (
                doc(&format!("  - spi: 4294967296\n    key: {}\n", b64(20))),
                "spec.keys[0].spi",
                "32 bits",
            ),
            (
                doc(&format!("  - spi: -1\n    key: {}\n", b64(20))),
                "spec.keys[0].spi",
                "non-negative",
            ),
            (doc(&format!("  - key: {}\n", b64(20))), "spec.keys[0].spi", "missing"),
            (
                doc(&format!(
                    "  - spi: 300\n    key: {}\n  - spi: 300\n    key: {}\n",
                    b64(20),
                    b64(36)
                )),
                "spec.keys[1].spi",
                "listed twice",
            ),
            (doc(""), "spec.keys", "missing"),
            (doc("    []\n"), "spec.keys", "empty"),
            ("kind: Other\n".to_string(), "kind", "expected \"SinewIPsecKeys\""),
            ("kind: [".to_string(), "(document)", "not YAML"),
        ];
        for (text, field, reason) in cases {
            let e = parse_keys("ipsec-keys.yaml", &text).unwrap_err();
            assert_eq!(e.field, field, "{text}\n{e}");
            assert!(e.reason.contains(reason), "{text}\n{e}");
            assert!(e.to_string().starts_with(&format!("ipsec-keys.yaml: {field}: ")), "{e}");
            assert!(!e.to_string().contains("BwcH"), "no key material in errors: {e}");
        }
    }

    #[test]
    fn read_keys_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_keys(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join(KEYS_FILE),
            doc(&format!("  - spi: 256\n    key: {}\n", b64(36))),
        )
        .unwrap();
        assert_eq!(read_keys(dir.path()).unwrap().unwrap().keys[0].spi, 256);
        std::fs::write(dir.path().join(KEYS_FILE), doc("  - spi: 1\n    key: x\n")).unwrap();
        let e = read_keys(dir.path()).unwrap_err();
        assert!(e.file.ends_with(KEYS_FILE) && e.field == "spec.keys[0].spi", "{e}");
        // The local snapshot reads it too, saying why it refuses it.
        let snap = crate::local::read_dir_snapshot(dir.path(), 0).unwrap();
        assert_eq!(snap.ipsec_keys, None);
        assert!(
            snap.errors.len() == 1 && snap.errors[0].to_string().contains("spec.keys[0].spi"),
            "{:?}",
            snap.errors
        );
    }
}
