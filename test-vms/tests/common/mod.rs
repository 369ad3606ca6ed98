//! Helpers shared by the privileged integration tests.

#![allow(dead_code)]

use sinew_testvms::netns::NetNs;

/// A prefix unique to this test process and `tag`, so test binaries and
/// tests run in parallel without sharing a namespace.
pub fn prefix(tag: &str) -> String {
    format!("tv{}-{tag}", std::process::id())
}

/// These tests need root; without it they must fail, not pass silently.
pub fn require_root() {
    sinew_testvms::support::require_root("this test");
}

/// Deletes a namespace when dropped.
pub struct NsGuard(pub NetNs);

impl Drop for NsGuard {
    fn drop(&mut self) {
        let _ = self.0.delete();
    }
}
