//! sinew-proxy's HPACK decoder (`h2::hpack`) over header blocks a peer
//! sends: it must never panic; a block is decoded twice in a row by one
//! decoder, as a connection would; and every field it yields, encoded by
//! the proxy's own encoder, decodes back to the same name, value and
//! sensitivity with a fresh decoder (what the proxy forwards is what it
//! judged).
#![no_main]

use sinew_proxy::h2::hpack::{encode, Decoder, Fields};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::new(4096);
    let mut f = Fields::default();
    for _ in 0..2 {
        if d.decode(data, &mut f, 64 * 1024).is_err() {
            return;
        }
        let mut block = Vec::new();
        for (n, v, x) in f.iter() {
            encode(&mut block, n, v, x.sensitive);
        }
        let mut again = Fields::default();
        Decoder::new(4096)
            .decode(&block, &mut again, usize::MAX)
            .expect("the proxy's own block decodes");
        assert_eq!(again.len(), f.len());
        for ((n1, v1, x1), (n2, v2, x2)) in f.iter().zip(again.iter()) {
            assert_eq!((n1, v1, x1.sensitive), (n2, v2, x2.sensitive));
        }
    }
});
