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
    if let Err(e) = std::fs::write(&tmp, bytes) {
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
    fn a_missing_parent_that_cannot_be_made_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(write_atomic(&file.join("child"), b"y").is_err());
    }
}
