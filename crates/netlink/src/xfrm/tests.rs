//! Byte layouts against the kernel's uapi header /usr/include/linux/xfrm.h
//! on x86_64/aarch64 Linux. The sizes and offsets asserted here were read
//! from that header with a C program (`sizeof`/`offsetof`, compiled by
//! clang): xfrm_selector 56 (daddr 0, saddr 16, dport 32, family 40,
//! prefixlen_d 42, prefixlen_s 43, proto 44, ifindex 48, user 52);
//! xfrm_id 24 (spi 16, proto 20); xfrm_lifetime_cfg 64; xfrm_lifetime_cur
//! 32 (bytes 0, packets 8, add_time 16); xfrm_usersa_info 224 (sel 0, id
//! 56, saddr 80, lft 96, curlft 160, stats 192, seq 204, reqid 208, family
//! 212, mode 214, replay_window 215, flags 216); xfrm_usersa_id 24 (spi 16,
//! family 20, proto 22); xfrm_userpolicy_info 168 (lft 56, curlft 120,
//! priority 152, index 156, dir 160, action 161); xfrm_userpolicy_id 64
//! (index 56, dir 60); xfrm_user_tmpl 64 (family 24, saddr 28, reqid 44,
//! mode 48, aalgos 52, ealgos 56, calgos 60); xfrm_algo_aead 72 + key
//! (alg_key_len 64, alg_icv_len 68); xfrm_replay_state_esn 24 + bitmap.
//! Message and attribute numbers: XFRM_MSG_NEWSA 16, DELSA 17, GETSA 18,
//! NEWPOLICY 19, DELPOLICY 20, GETPOLICY 21, UPDPOLICY 25, UPDSA 26;
//! XFRMA_TMPL 5, XFRMA_ALG_AEAD 18, XFRMA_REPLAY_ESN_VAL 23, XFRMA_IF_ID 31.

use super::*;
use crate::message::{read_u16, read_u32, read_u64, NLMSG_HDRLEN};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa() -> Sa {
    Sa {
        src: ip("172.30.0.11"),
        dst: ip("172.30.0.12"),
        mode: Mode::Tunnel,
        spi: 0x0102_0304,
        reqid: 7,
        key: (1..=20).collect(),
        if_id: 0x5157,
    }
}

fn policy() -> Policy {
    Policy {
        sel: Selector::prefixes(Prefix::new(ip("10.244.1.0"), 24), Prefix::new(ip("10.244.2.0"), 24)),
        dir: Dir::Out,
        priority: 100,
        tmpl: Template {
            src: ip("172.30.0.11"),
            dst: ip("172.30.0.12"),
            mode: Mode::Tunnel,
            spi: 0x0102_0304,
            reqid: 7,
        },
        if_id: 0x5157,
    }
}

#[test]
fn numbers_match_the_uapi_header() {
    assert_eq!(
        (XFRM_MSG_NEWSA, XFRM_MSG_DELSA, XFRM_MSG_GETSA, XFRM_MSG_UPDSA),
        (16, 17, 18, 26)
    );
    assert_eq!(
        (
            XFRM_MSG_NEWPOLICY,
            XFRM_MSG_DELPOLICY,
            XFRM_MSG_GETPOLICY,
            XFRM_MSG_UPDPOLICY
        ),
        (19, 20, 21, 25)
    );
    assert_eq!(
        (XFRMA_TMPL, XFRMA_ALG_AEAD, XFRMA_REPLAY_ESN_VAL, XFRMA_IF_ID),
        (5, 18, 23, 31)
    );
    assert_eq!((XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_POLICY_FWD), (0, 1, 2));
    assert_eq!((XFRM_MODE_TUNNEL, XFRM_STATE_ESN), (1, 128));
}

#[test]
fn selector_layout() {
    let b = selector(&policy().sel);
    assert_eq!(b.len(), 56);
    assert_eq!(&b[0..4], &[10, 244, 2, 0], "daddr at 0");
    assert_eq!(&b[4..16], &[0; 12]);
    assert_eq!(&b[16..20], &[10, 244, 1, 0], "saddr at 16");
    assert_eq!(&b[32..40], &[0; 8], "any port");
    assert_eq!(read_u16(&b, 40), Some(2), "family AF_INET at 40");
    assert_eq!((b[42], b[43], b[44]), (24, 24, 0), "prefixlen_d, prefixlen_s, proto");
    assert_eq!(&b[48..56], &[0; 8], "ifindex, user");
    assert_eq!(parse_selector(&b), Some(policy().sel));

    // IPv6 fills the whole xfrm_address_t.
    let v6 = Selector::prefixes(Prefix::any_like(ip("fd00::1")), Prefix::host(ip("fd00::2")));
    let b = selector(&v6);
    assert_eq!(&b[0..16], &ip6_octets("fd00::2"));
    assert_eq!(read_u16(&b, 40), Some(10));
    assert_eq!((b[42], b[43]), (128, 0));
    assert_eq!(parse_selector(&b), Some(v6));
}

fn ip6_octets(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

#[test]
fn usersa_info_layout() {
    let b = usersa_info(&sa());
    assert_eq!(b.len(), 224);
    assert_eq!(&b[0..40], &[0; 40], "empty selector");
    assert_eq!(read_u16(&b, 40), Some(2), "selector family");
    assert_eq!(&b[56..60], &[172, 30, 0, 12], "id.daddr at 56");
    assert_eq!(&b[72..76], &[1, 2, 3, 4], "id.spi at 72, big-endian");
    assert_eq!(b[76], 50, "id.proto ESP at 76");
    assert_eq!(&b[80..84], &[172, 30, 0, 11], "saddr at 80");
    for at in [96, 104, 112, 120] {
        assert_eq!(read_u64(&b, at), Some(u64::MAX), "byte/packet limits XFRM_INF at {at}");
    }
    assert_eq!(&b[128..204], &[0; 76], "no expiry, zero curlft and stats");
    assert_eq!(read_u32(&b, 208), Some(7), "reqid at 208");
    assert_eq!(read_u16(&b, 212), Some(2), "family at 212");
    assert_eq!((b[214], b[215], b[216]), (1, 0, 128), "tunnel, window in ESN, flag ESN");
    assert_eq!(&b[217..224], &[0; 7]);
}

#[test]
fn aead_and_replay_esn_layout() {
    let key: Vec<u8> = (1..=36).collect();
    let b = algo_aead(AEAD_GCM_AES, &key, GCM_ICV_BITS);
    assert_eq!(b.len(), 72 + 36);
    assert_eq!(&b[..17], b"rfc4106(gcm(aes))");
    assert_eq!(&b[17..64], &[0; 47], "name NUL padded to 64");
    assert_eq!(read_u32(&b, 64), Some(288), "key length in bits, salt included");
    assert_eq!(read_u32(&b, 68), Some(128), "ICV bits");
    assert_eq!(&b[72..], &key[..]);

    let r = replay_esn(128);
    assert_eq!(r.len(), 24 + 16, "4 bitmap words");
    assert_eq!(read_u32(&r, 0), Some(4), "bmp_len");
    assert_eq!(&r[4..20], &[0; 16], "oseq, seq, oseq_hi, seq_hi");
    assert_eq!(read_u32(&r, 20), Some(128), "replay_window");
    assert_eq!(replay_esn(100).len(), 24 + 16, "rounded up to whole words");
}

#[test]
fn sa_message_and_parse_round_trip() {
    let b = sa_msg(&sa(), false).finish(9);
    assert_eq!(read_u16(&b, 4), Some(XFRM_MSG_NEWSA));
    assert_eq!(read_u16(&b, 6), Some(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL));
    let body = &b[NLMSG_HDRLEN..];
    let a: Vec<_> = attrs(&body[USERSA_INFO_LEN..]).collect();
    assert_eq!(
        a.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        [XFRMA_ALG_AEAD, XFRMA_REPLAY_ESN_VAL, XFRMA_IF_ID]
    );
    assert_eq!(a[0].1.len(), 72 + 20);
    assert_eq!(a[2].1, &0x5157u32.to_ne_bytes());
    let b = sa_msg(&sa(), true).finish(9);
    assert_eq!(read_u16(&b, 4), Some(XFRM_MSG_UPDSA));
    assert_eq!(read_u16(&b, 6), Some(NLM_F_REQUEST));

    // What the kernel sends back has the same layout, with counters.
    let mut reply = b[NLMSG_HDRLEN..].to_vec();
    reply[160..168].copy_from_slice(&1234u64.to_ne_bytes());
    reply[168..176].copy_from_slice(&5u64.to_ne_bytes());
    reply[176..184].copy_from_slice(&1_700_000_000u64.to_ne_bytes());
    reply[200..204].copy_from_slice(&3u32.to_ne_bytes());
    let got = parse_sa(&reply).unwrap();
    assert_eq!(
        got,
        SaInfo {
            src: ip("172.30.0.11"),
            dst: ip("172.30.0.12"),
            spi: 0x0102_0304,
            proto: 50,
            reqid: 7,
            mode: 1,
            if_id: 0x5157,
            aead: Some(AEAD_GCM_AES.into()),
            bytes: 1234,
            packets: 5,
            add_time: 1_700_000_000,
            replay_drops: 0,
            integrity_failed: 3,
        }
    );
    assert_eq!(parse_sa(&reply[..100]), None);
}

#[test]
fn usersa_id_layout() {
    let b = usersa_id(ip("172.30.0.12"), 0x0a0b_0c0d);
    assert_eq!(b.len(), 24);
    assert_eq!(&b[0..4], &[172, 30, 0, 12]);
    assert_eq!(&b[16..20], &[10, 11, 12, 13], "spi big-endian at 16");
    assert_eq!(read_u16(&b, 20), Some(2), "family at 20");
    assert_eq!(b[22], 50, "proto at 22");
}

#[test]
fn policy_layouts_and_parse_round_trip() {
    let p = policy();
    let b = userpolicy_info(&p);
    assert_eq!(b.len(), 168);
    assert_eq!(&b[..56], &selector(&p.sel));
    assert_eq!(read_u64(&b, 56), Some(u64::MAX), "lft.soft_byte_limit at 56");
    assert_eq!(&b[120..152], &[0; 32], "curlft");
    assert_eq!(read_u32(&b, 152), Some(100), "priority at 152");
    assert_eq!(read_u32(&b, 156), Some(0), "index at 156: the kernel's choice");
    assert_eq!((b[160], b[161], b[162], b[163]), (1, 0, 0, 0), "dir out, allow");

    let t = user_tmpl(&p.tmpl);
    assert_eq!(t.len(), 64);
    assert_eq!(&t[0..4], &[172, 30, 0, 12], "id.daddr");
    assert_eq!(&t[16..20], &[1, 2, 3, 4], "id.spi");
    assert_eq!(t[20], 50, "id.proto");
    assert_eq!(read_u16(&t, 24), Some(2), "family at 24");
    assert_eq!(&t[28..32], &[172, 30, 0, 11], "saddr at 28");
    assert_eq!(read_u32(&t, 44), Some(7), "reqid at 44");
    assert_eq!((t[48], t[49], t[50]), (1, 0, 0), "tunnel, share, not optional");
    for at in [52, 56, 60] {
        assert_eq!(read_u32(&t, at), Some(u32::MAX), "every algorithm at {at}");
    }

    let id = userpolicy_id(&p.sel, Dir::Fwd);
    assert_eq!(id.len(), 64);
    assert_eq!(&id[..56], &selector(&p.sel));
    assert_eq!((read_u32(&id, 56), id[60]), (Some(0), 2));

    let m = policy_msg(&p, false).finish(1);
    assert_eq!(read_u16(&m, 4), Some(XFRM_MSG_NEWPOLICY));
    assert_eq!(read_u16(&policy_msg(&p, true).finish(1), 4), Some(XFRM_MSG_UPDPOLICY));
    let mut reply = m[NLMSG_HDRLEN..].to_vec();
    reply[156..160].copy_from_slice(&0x209u32.to_ne_bytes());
    let got = parse_policy(&reply).unwrap();
    assert_eq!(
        got,
        PolicyInfo {
            sel: p.sel,
            dir: Dir::Out,
            priority: 100,
            index: 0x209,
            action: XFRM_POLICY_ALLOW,
            if_id: 0x5157,
            tmpls: vec![p.tmpl],
        }
    );
    assert_eq!(Dir::from_raw(3), None, "XFRM_POLICY_MASK is no direction");
}

#[test]
fn transport_mode_protocol_and_port_and_no_key_in_debug() {
    let sel = Selector {
        src: Prefix::host(ip("172.30.0.11")),
        dst: Prefix::host(ip("172.30.0.12")),
        proto: 17,
        dport: 8472,
    };
    let b = selector(&sel);
    assert_eq!(&b[32..34], &8472u16.to_be_bytes(), "dport at 32, big-endian");
    assert_eq!(&b[34..36], &[0xff, 0xff], "dport_mask at 34: this port only");
    assert_eq!(&b[36..40], &[0; 4], "any source port");
    assert_eq!(b[44], 17, "proto at 44");
    assert_eq!(parse_selector(&b), Some(sel));
    assert_eq!(sel.to_string(), "172.30.0.11/32 -> 172.30.0.12/32 proto 17 dport 8472");

    let t = Sa {
        mode: Mode::Transport,
        ..sa()
    };
    assert_eq!(usersa_info(&t)[214], XFRM_MODE_TRANSPORT);
    let tmpl = Template {
        mode: Mode::Transport,
        ..policy().tmpl
    };
    let raw = user_tmpl(&tmpl);
    assert_eq!(raw[48], 0, "transport mode at 48");
    assert_eq!(parse_tmpl(&raw), Some(tmpl));
    let shown = format!("{t:?}");
    assert!(shown.contains("<20 bytes>") && !shown.contains("[1, 2, 3"), "{shown}");
}
