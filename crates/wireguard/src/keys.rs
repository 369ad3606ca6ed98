//! Node keys: parsing and checking key material, and the node's key pair
//! kept in its state directory.
//!
//! The private key lives in one file, mode 0600, written once; it is never
//! printed: [`PrivateKey`]'s `Debug` shows only the public half. Keys are
//! text as `wg genkey` writes them (base64 of 32 bytes), so that an
//! operator's tools read them.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use boringtun::x25519;
use rand::RngCore;

/// The key file's name in the node's state directory.
pub const PRIVATE_KEY_FILE: &str = "wireguard.key";

const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "{what} {value:?} is not base64: {reason}; a WireGuard key is 44 characters of base64 (as `wg genkey` writes)"
    )]
    NotBase64 {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("{what} decodes to {len} bytes, a WireGuard key has 32; check that the whole key was copied")]
    WrongLength { what: &'static str, len: usize },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; KEY_LEN]);

/// A Curve25519 private key. Never printed.
#[derive(Clone)]
pub struct PrivateKey([u8; KEY_LEN]);

fn decode(what: &'static str, text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let text = text.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| KeyError::NotBase64 {
            what,
            // A private key that fails to parse is still secret material:
            // name only its length.
            value: if what == "private key" {
                format!("<{} characters>", text.len())
            } else {
                text.chars().take(64).collect()
            },
            reason: e.to_string(),
        })?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::WrongLength { what, len: bytes.len() })
}

fn encode(b: &[u8; KEY_LEN]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode("public key", text).map(Self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

impl PrivateKey {
    pub fn generate() -> Self {
        let mut b = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut b);
        // Clamped as X25519 requires (the same bits x25519 clamps on use),
        // so the stored key is what `wg pubkey` expects.
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        Self(b)
    }

    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode("private key", text).map(Self)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.secret()).to_bytes())
    }

    pub fn secret(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }

    /// The raw bytes, for the kernel device (WGDEVICE_A_PRIVATE_KEY).
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public())
    }
}

impl Drop for PrivateKey {
    fn drop(&mut self) {
        // Best effort: the key does not stay in memory its owner freed
        // (black_box keeps the write from being elided).
        self.0 = [0; KEY_LEN];
        std::hint::black_box(&self.0);
    }
}

/// The node's key pair, and when the private key was made.
#[derive(Debug, Clone)]
pub struct NodeKey {
    pub private: PrivateKey,
    pub public: PublicKey,
    pub created: SystemTime,
    pub path: PathBuf,
}

/// Reads the node's private key from `state_dir`, or makes one and writes
/// it (mode 0600, created exclusively so two agents never write two keys).
/// A key file that others may read is refused rather than used: the key
/// may have leaked, and the operator must decide (delete it for a new one).
pub fn load_or_create(state_dir: &Path) -> Result<NodeKey, KeyError> {
    let path = state_dir.join(PRIVATE_KEY_FILE);
    let file_err = |reason: String| KeyError::File {
        path: path.clone(),
        reason,
    };
    std::fs::create_dir_all(state_dir).map_err(|e| file_err(format!("cannot create the state directory: {e}")))?;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            let key = PrivateKey::generate();
            let text = format!("{}\n", encode(key.bytes()));
            if let Err(e) = f.write_all(text.as_bytes()) {
                let _ = std::fs::remove_file(&path);
                return Err(file_err(format!("cannot write the new key: {e}")));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(file_err(format!("cannot create the key file: {e}"))),
    }
    let meta = std::fs::metadata(&path).map_err(|e| file_err(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_err(format!(
            "mode {mode:o}: the private key must be readable by its owner only (0600); \
             if it may have leaked, delete the file and restart the agent for a new key, \
             else chmod 600 it"
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let private = PrivateKey::parse(&text).map_err(|e| file_err(e.to_string()))?;
    Ok(NodeKey {
        public: private.public(),
        private,
        created: meta.modified().unwrap_or_else(|_| SystemTime::now()),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_bad_material_is_refused() {
        let k = PrivateKey::generate();
        let text = encode(k.bytes());
        assert_eq!(text.len(), 44);
        assert_eq!(PrivateKey::parse(&text).unwrap().public(), k.public());
        let p = k.public().to_string();
        assert_eq!(PublicKey::parse(&p).unwrap(), k.public());

        let short = encode(&[1u8; KEY_LEN])[..20].to_string() + "==";
        assert!(matches!(
            PublicKey::parse(&base64::engine::general_purpose::STANDARD.encode([1u8; 16])),
            Err(KeyError::WrongLength { len: 16, .. })
        ));
        let e = PublicKey::parse("not base64 at all!").unwrap_err();
        assert!(e.to_string().contains("not base64"), "{e}");
        assert!(PublicKey::parse(&short).is_err());
        // A private key's text never appears in an error.
        let secret = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0!!";
        let e = PrivateKey::parse(secret).unwrap_err().to_string();
        assert!(!e.contains("c2Vj"), "{e}");
        // Nor in Debug.
        assert!(!format!("{k:?}").contains(&text));
    }

    #[test]
    fn public_keys_agree_on_a_shared_secret() {
        // The public half is right iff both sides derive the same secret.
        let (a, b) = (PrivateKey::generate(), PrivateKey::generate());
        let ab = a.secret().diffie_hellman(&x25519::PublicKey::from(b.public().0));
        let ba = b.secret().diffie_hellman(&x25519::PublicKey::from(a.public().0));
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        assert_ne!(a.public(), b.public());
    }

    #[test]
    fn key_file_is_0600_stable_and_a_readable_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(&a.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.public, b.public);

        std::fs::set_permissions(&a.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("0600"), "{e}");

        std::fs::set_permissions(&a.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&a.path, "AAAA\n").unwrap();
        let e = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(e.contains("3 bytes"), "{e}");
    }
}
