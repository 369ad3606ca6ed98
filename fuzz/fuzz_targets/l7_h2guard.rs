//! sinew-proxy's HTTP/2 frame guard (`h2guard::FrameScan`) over the bytes a
//! client sends and the bytes a server writes: it must never panic, and
//! what it finds must not depend on how reads split the bytes (the first
//! byte picks a split size).
#![no_main]

use sinew_proxy::h2guard::{Found, FrameScan};

fn run(mut s: FrameScan, bytes: &[u8], step: usize) -> (Option<u32>, u64, bool) {
    let mut found = None;
    for c in bytes.chunks(step) {
        if let Found::Violation(at, v) = s.feed(c) {
            assert!(at <= c.len());
            found = Some(v.code);
            break;
        }
    }
    (found, s.fault_resets, s.at_boundary())
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let whole = bytes.len().max(1);
    assert_eq!(
        run(FrameScan::client(), bytes, whole).0,
        run(FrameScan::client(), bytes, step).0
    );
    assert_eq!(
        run(FrameScan::server(), bytes, whole),
        run(FrameScan::server(), bytes, step)
    );
});
