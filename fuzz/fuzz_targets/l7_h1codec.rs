//! sinew-proxy's HTTP/1 codec (`h1::codec`) over the bytes a client sends.
//! It must never panic, and:
//! - a head that parses parses the same from the bytes alone, and every
//!   shorter prefix of it reads as incomplete, never as an error (so how
//!   reads split a head cannot change its verdict);
//! - the head the proxy sends on parses again to the same method, target
//!   and body framing (what was judged is what the upstream frames);
//! - a chunked body ends at the same byte however it is split (the first
//!   byte picks the split size).
#![no_main]

use sinew_proxy::h1::codec::{parse_request, write_request, Chunked};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    if let Ok(Some(h)) = parse_request(bytes, 32) {
        assert!(h.len <= bytes.len());
        let again = parse_request(&bytes[..h.len], 32).unwrap().unwrap();
        assert_eq!(again, h);
        for cut in 0..h.len {
            assert_eq!(parse_request(&bytes[..cut], 32), Ok(None), "prefix of {cut} bytes");
        }
        let mut out = Vec::new();
        let target = &bytes[h.target.clone()];
        write_request(&mut out, bytes, &h, target, false);
        let sent = parse_request(&out, 64).unwrap().unwrap();
        assert_eq!(&out[sent.method.clone()], &bytes[h.method.clone()]);
        assert_eq!(&out[sent.target.clone()], target);
        assert_eq!(sent.body, h.body);
        assert_eq!(sent.len, out.len());
    }
    let step = usize::from(split).max(1);
    let mut whole = Chunked::new(4096);
    let a = whole.advance(bytes);
    let mut pieces = Chunked::new(4096);
    let mut b = Ok(0);
    for c in bytes.chunks(step) {
        match pieces.advance(c) {
            Ok(n) => {
                b = b.map(|t| t + n);
                if pieces.done() {
                    break;
                }
            }
            Err(e) => {
                b = Err(e);
                break;
            }
        }
    }
    assert_eq!(a, b, "split in {step}-byte pieces");
    assert_eq!(whole.done(), pieces.done());
});
