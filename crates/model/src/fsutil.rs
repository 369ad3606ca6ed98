//! The one atomic file write of the project (datastore documents, the
//! agent's IPAM and endpoint state, the lab's state and manifests).

use std::path::Path;

/// Replaces `path` with `bytes` so that a reader, a watcher, or a writer
/// that dies mid-write sees either the old or the new content, never a torn
/// file. Creates the parent directory when missing.
///
/// The temporary file is `.NAME.tmpPID` next to `path`: it starts with a dot
/// and does not end in `.yaml` or `.json`, so directory watchers that filter
/// on the extension ignore it, and two processes writing the same file
/// (agents sharing a datastore) never share a temporary.
///
/// No fsync: this state must survive the process, not the node. A node that
/// loses power loses every pod with it, and the runtime re-ADDs them; a
/// process crash leaves the page cache and the rename intact. An fsync costs
/// 5-50 ms per write on the disks measured here, which would dominate CNI
/// ADD latency.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, None)
}

/// [`write_atomic`] for key material: the file is created with mode 0600
/// before a byte is written, so the key is never readable by others, not
/// even while it is being written.
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_mode(path, bytes, Some(0o600))
}

fn write_atomic_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = match mode {
        None => std::fs::write(&tmp, bytes),
        Some(mode) => {
            // A temporary left by a process that died keeps its mode when
            // opened again: start from none.
            let _ = std::fs::remove_file(&tmp);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .and_then(|mut f| f.write_all(bytes))
        }
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_creates_parents_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.yaml");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.yaml")]);
    }

    #[test]
    fn a_private_write_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_atomic_private(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_missing_parent_that_cannot_be_made_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(write_atomic(&file.join("child"), b"y").is_err());
    }
}
