//! sinew-proxy's HTTP/1 smuggling guard (`h1guard::Framing`) over the
//! bytes a client sends: it must never panic, and what it finds must not
//! depend on how reads split the bytes (the first byte picks a split size).
#![no_main]

use sinew_proxy::h1guard::Framing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let mut whole = Framing::new(16 * 1024);
    let a = whole.feed(bytes);
    let mut pieces = Framing::new(16 * 1024);
    let mut b = None;
    for c in bytes.chunks(step) {
        if let Some(x) = pieces.feed(c) {
            b.get_or_insert(x);
        }
    }
    assert_eq!(a, b, "split in {step}-byte pieces");
});
