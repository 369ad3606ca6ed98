//! Every struct shared with the datapath has the same size and field offsets
//! in Rust as in the compiled objects' BTF (the C compiler's view).

use std::collections::HashMap;
use std::mem::{offset_of, size_of};

use object::{Object, ObjectSection};
use sinew_abi::*;

/// A struct as BTF describes it: size and member byte offsets.
#[derive(Debug)]
struct BtfStruct {
    size: u32,
    members: HashMap<String, u32>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Reads the named structs out of the .BTF section. Only what the layout
/// check needs: every kind is skipped by its documented trailer size.
fn btf_structs(obj: &[u8]) -> HashMap<String, BtfStruct> {
    let file = object::File::parse(obj).expect("datapath object is ELF");
    let btf = file.section_by_name(".BTF").expect("object has BTF (compile with -g)");
    let btf = btf.data().unwrap();
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(btf, 4) as usize;
    let (type_off, type_len) = (u32_at(btf, 8) as usize, u32_at(btf, 12) as usize);
    let str_off = u32_at(btf, 16) as usize;
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    let strings = &btf[hdr_len + str_off..];
    let name = |off: u32| -> String {
        let s = &strings[off as usize..];
        let end = s.iter().position(|&c| c == 0).unwrap();
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    let mut out = HashMap::new();
    let mut pos = 0;
    while pos < types.len() {
        let name_off = u32_at(types, pos);
        let info = u32_at(types, pos + 4);
        let size = u32_at(types, pos + 8);
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        pos += 12;
        let trailer = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 => 12 * vlen,
            6 | 13 => 8 * vlen,
            15 | 19 => 12 * vlen,
            _ => 0,
        };
        if kind == 4 && name_off != 0 {
            let mut members = HashMap::new();
            for m in 0..vlen {
                let base = pos + m * 12;
                let raw = u32_at(types, base + 8);
                let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                assert_eq!(bits % 8, 0, "no bitfields in the ABI");
                members.insert(name(u32_at(types, base)), bits / 8);
            }
            out.insert(name(name_off), BtfStruct { size, members });
        }
        pos += trailer;
    }
    out
}

macro_rules! check {
    ($structs:expr, $c:literal, $t:ty, [$($f:ident),* $(,)?]) => {{
        let s = $structs.get($c).unwrap_or_else(|| panic!("struct {} not in BTF", $c));
        assert_eq!(s.size as usize, size_of::<$t>(), "size of {}", $c);
        $(
            assert_eq!(
                s.members.get(stringify!($f).trim_start_matches("r#")).copied(),
                Some(offset_of!($t, $f) as u32),
                "offset of {}.{}", $c, stringify!($f)
            );
        )*
        assert_eq!(s.members.len(), [$(stringify!($f)),*].len(), "{} has fields Rust lacks", $c);
    }};
}

#[test]
fn shared_structs_match_btf() {
    for obj in [BPF_LXC, BPF_HOST, BPF_OVERLAY] {
        let s = btf_structs(obj);
        check!(s, "ipcache_key", IpcacheKey, [prefixlen, family, pad, addr]);
        check!(
            s,
            "ipcache_value",
            IpcacheValue,
            [identity, tunnel_endpoint, ifindex, flags]
        );
        check!(
            s,
            "endpoint_info",
            EndpointInfo,
            [ipv4, identity, id, flags, pod_mac, host_mac, policy_rev]
        );
        check!(
            s,
            "policy_key",
            PolicyKey,
            [prefixlen, ep_id, identity, direction, proto, dport]
        );
        check!(s, "policy_value", PolicyValue, [rule_id, proxy_port, action, r#match]);
        check!(s, "ct_key", CtKey, [saddr, daddr, sport, dport, proto, direction, pad]);
        check!(
            s,
            "ct_entry",
            CtEntry,
            [last_seen_ns, ep_id, policy_rev, rule_id, flags, pad, proxy_port]
        );
        check!(s, "metrics_value", MetricsValue, [packets, bytes]);
        check!(
            s,
            "flow_event",
            FlowEvent,
            [
                ts_ns,
                saddr,
                daddr,
                sport,
                dport,
                proto,
                r#type,
                reason,
                dir,
                ifindex,
                ep_id,
                peer_identity,
                rule_id,
                len,
                hook,
                obs,
                tcp_flags,
                verdict,
                r#match,
                pad,
                icmp_id,
                pad2,
                packets,
                bytes
            ]
        );
        check!(
            s,
            "flow_agg_key",
            FlowAggKey,
            [saddr, daddr, sport, dport, proto, hook, icmp_id]
        );
        check!(
            s,
            "flow_agg",
            FlowAgg,
            [
                acc,
                last_seen_ns,
                last_report_ns,
                ifindex,
                ep_id,
                peer_identity,
                dir,
                obs,
                state,
                pad
            ]
        );
    }
    let sock = btf_structs(BPF_SOCK);
    check!(sock, "lb_svc_key", LbSvcKey, [vip, port, proto, scope]);
    check!(
        sock,
        "lb_svc_value",
        LbSvcValue,
        [svc_id, count, flags, affinity_timeout, pad]
    );
    check!(sock, "lb_slot_key", LbSlotKey, [svc_id, slot]);
    check!(sock, "lb_backend", LbBackend, [addr, port, proto, flags, svc_id, pad]);
    check!(sock, "lb_maglev_key", LbMaglevKey, [svc_id, index]);
    check!(sock, "lb_affinity_key", LbAffinityKey, [netns_cookie, svc_id, pad]);
    check!(
        sock,
        "lb_affinity_value",
        LbAffinityValue,
        [last_used_ns, backend_id, pad]
    );
    check!(sock, "lb_revnat_key", LbRevnatKey, [cookie, addr, port, pad]);
    check!(sock, "lb_revnat_value", LbRevnatValue, [vip, port, pad]);
    let host = btf_structs(BPF_HOST);
    check!(host, "nat_key", NatKey, [saddr, daddr, sport, dport, proto, pad]);
    check!(host, "nat_value", NatValue, [addr, port, pad, created_ns]);
    check!(
        host,
        "lb_nat_entry",
        LbNatEntry,
        [daddr, saddr, dport, sport, dir, pad, created_ns]
    );
}
