//! HPACK's Huffman code (RFC 7541 section 5.2 and Appendix B), decoding
//! only: the proxy never Huffman-encodes what it sends.
//!
//! The code is canonical: ordering the symbols by code length, then by
//! value, and counting up gives every code. So only the 257 lengths are
//! kept here; the codes, the first code of each length and the symbols in
//! code order are computed from them at compile time, and a test checks a
//! few codes against Appendix B.

/// Code length in bits of each symbol 0..=255 and of EOS (256).
const LENS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28,
    28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12,
    10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6,
    5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22,
    22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20,
    22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28,
    27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28,
    27, 27, 27, 27, 27, 26, 30,
];

const MIN_LEN: usize = 5;
const MAX_LEN: usize = 30;
const EOS: u16 = 256;

/// Per length: the first code, how many codes, and where the symbols of
/// that length start in [`Tables::sorted`].
struct Tables {
    first: [u32; MAX_LEN + 2],
    /// One past the last code of each length, aligned to the left of 32
    /// bits (as u64, since the last, EOS's, is 2^32). Non-decreasing, so
    /// a code's length is the first whose limit is above the next 32 bits.
    limit: [u64; MAX_LEN + 2],
    offset: [u16; MAX_LEN + 2],
    sorted: [u16; 257],
}

const fn tables() -> Tables {
    let mut t = Tables {
        first: [0; MAX_LEN + 2],
        limit: [0; MAX_LEN + 2],
        offset: [0; MAX_LEN + 2],
        sorted: [0; 257],
    };
    let mut next: u32 = 0;
    let mut n: usize = 0;
    let mut len = MIN_LEN;
    while len <= MAX_LEN {
        t.first[len] = next;
        t.offset[len] = n as u16;
        let mut s = 0;
        while s < 257 {
            if LENS[s] as usize == len {
                t.sorted[n] = s as u16;
                n += 1;
                next += 1;
            }
            s += 1;
        }
        t.limit[len] = (next as u64) << (32 - len);
        next <<= 1;
        len += 1;
    }
    t
}

static T: Tables = tables();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuffmanError {
    /// The EOS symbol inside a string (RFC 7541 5.2).
    Eos,
    /// Padding longer than 7 bits, or not the most significant bits of
    /// EOS (all ones).
    Padding,
}

/// Appends the decoding of `src` to `out`.
pub fn decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    out.reserve(src.len() + src.len() / 2);
    // Bits not yet decoded, left-aligned.
    let mut acc: u64 = 0;
    let mut nbits: u32 = 0;
    let mut i = 0;
    loop {
        while nbits <= 56 && i < src.len() {
            acc |= (src[i] as u64) << (56 - nbits);
            nbits += 8;
            i += 1;
        }
        if nbits < MIN_LEN as u32 {
            break;
        }
        let window = acc >> 32;
        let mut len = MIN_LEN;
        while len <= MAX_LEN && window >= T.limit[len] {
            len += 1;
        }
        if len > MAX_LEN || len as u32 > nbits {
            // Not a whole code: the padding, checked below.
            break;
        }
        let idx = T.offset[len] as u32 + ((window >> (32 - len)) as u32 - T.first[len]);
        let sym = T.sorted[idx as usize];
        if sym == EOS {
            return Err(HuffmanError::Eos);
        }
        out.push(sym as u8);
        acc <<= len;
        nbits -= len as u32;
    }
    if nbits > 7 {
        return Err(HuffmanError::Padding);
    }
    let ones = if nbits == 0 { 0 } else { !0u64 << (64 - nbits) };
    if acc & ones != ones {
        return Err(HuffmanError::Padding);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn code(sym: usize) -> (u32, u8) {
    let len = LENS[sym] as usize;
    let pos = (T.offset[len] as usize..257)
        .find(|&k| T.sorted[k] as usize == sym)
        .unwrap();
    (T.first[len] + (pos - T.offset[len] as usize) as u32, len as u8)
}

/// Huffman-encodes `src` (tests only: the proxy sends raw strings).
#[cfg(test)]
pub(crate) fn encode(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc: u64 = 0;
    let mut nbits = 0u32;
    for &b in src {
        let (c, l) = code(b as usize);
        acc = (acc << l) | c as u64;
        nbits += l as u32;
        while nbits >= 8 {
            out.push((acc >> (nbits - 8)) as u8);
            nbits -= 8;
        }
    }
    if nbits > 0 {
        out.push(((acc << (8 - nbits)) as u8) | (0xff >> nbits));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_those_of_appendix_b() {
        // A few rows of RFC 7541 Appendix B: (symbol, code, length).
        for (sym, c, l) in [
            (b'0' as usize, 0x0, 5),
            (b'a' as usize, 0x3, 5),
            (b't' as usize, 0x9, 5),
            (b' ' as usize, 0x14, 6),
            (b'%' as usize, 0x15, 6),
            (b'A' as usize, 0x21, 6),
            (b':' as usize, 0x5c, 7),
            (b'&' as usize, 0xf8, 8),
            (0, 0x1ff8, 13),
            (1, 0x7fffd8, 23),
            (10, 0x3ffffffc, 30),
            (255, 0x3ffffee, 26),
            (256, 0x3fffffff, 30),
        ] {
            assert_eq!(code(sym), (c, l), "symbol {sym}");
        }
    }

    #[test]
    fn decodes_the_strings_of_appendix_c() {
        // RFC 7541 C.4.1: "www.example.com"; C.4.2: "no-cache".
        let www = [0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        let mut out = Vec::new();
        decode(&www, &mut out).unwrap();
        assert_eq!(out, b"www.example.com");
        out.clear();
        decode(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], &mut out).unwrap();
        assert_eq!(out, b"no-cache");
    }

    #[test]
    fn every_byte_round_trips_and_bad_padding_or_eos_is_refused() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
        for s in [&b""[..], b"a", b"ab", b"/index.html?x=%20"] {
            out.clear();
            decode(&encode(s), &mut out).unwrap();
            assert_eq!(out, s);
        }
        // 'a' (00011) padded with zeros, not ones.
        assert_eq!(decode(&[0x18], &mut out), Err(HuffmanError::Padding));
        // A whole byte of padding.
        let mut e = encode(b"0");
        e.push(0xff);
        assert_eq!(decode(&e, &mut out), Err(HuffmanError::Padding));
        // EOS itself (30 ones) and two bits of padding.
        assert_eq!(decode(&[0xff, 0xff, 0xff, 0xff], &mut out), Err(HuffmanError::Eos));
    }
}
