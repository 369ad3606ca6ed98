//! L7 flow events in batches whose strings travel once ([`FlowEvents`]):
//! the proxy builds a batch with a [`Packer`], the agent reads an event
//! back with [`FlowEvents::flow`]. An event is then a few integers to
//! encode, decode and keep; only the strings new to its batch cost more.

use std::collections::HashMap;
use std::hash::BuildHasher;

use crate::proxy_v1::{FlowEvents, L7Flow, PackedFlow};

/// Builds one [`FlowEvents`] at a time. Hosts and paths come from clients,
/// so the table is keyed by a randomly seeded hash (std's SipHash): no
/// client can pick strings that collide.
pub struct Packer {
    batch: FlowEvents,
    /// Hash of a string -> its index. Two strings with one hash (never
    /// seen in practice) both go in the table, the second unindexed.
    index: HashMap<u64, u32>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Packer {
    fn default() -> Self {
        Self::new()
    }
}

impl Packer {
    pub fn new() -> Self {
        let mut p = Packer {
            batch: FlowEvents::default(),
            index: HashMap::new(),
            hasher: Default::default(),
        };
        p.batch.strings.push(String::new());
        p
    }

    /// The index of `s` in this batch's table, added if new.
    pub fn string(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let h = self.hasher.hash_one(s);
        let strings = &mut self.batch.strings;
        match self.index.get(&h) {
            Some(&i) if strings[i as usize] == s => i,
            found => {
                let i = strings.len() as u32;
                strings.push(s.to_owned());
                if found.is_none() {
                    self.index.insert(h, i);
                }
                i
            }
        }
    }

    pub fn push(&mut self, f: PackedFlow) {
        self.batch.flows.push(f);
    }

    /// An event already in the agent's form, packed.
    pub fn push_flow(&mut self, f: &L7Flow) {
        let p = PackedFlow {
            time_unix_nanos: f.time_unix_nanos,
            direction: f.direction,
            src_ip: self.string(&f.src_ip),
            src_port: f.src_port,
            src_identity: f.src_identity,
            src_namespace: self.string(&f.src_namespace),
            src_name: self.string(&f.src_name),
            dst_ip: self.string(&f.dst_ip),
            dst_port: f.dst_port,
            dst_identity: f.dst_identity,
            dst_namespace: self.string(&f.dst_namespace),
            dst_name: self.string(&f.dst_name),
            protocol: self.string(&f.protocol),
            method: self.string(&f.method),
            host: self.string(&f.host),
            path: self.string(&f.path),
            status: f.status,
            latency_micros: f.latency_micros,
            verdict: f.verdict,
            rule: self.string(&f.rule),
            drop_reason: self.string(&f.drop_reason),
            grpc_status: f.grpc_status,
        };
        self.push(p);
    }

    /// Events in the batch so far.
    pub fn len(&self) -> usize {
        self.batch.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.flows.is_empty()
    }

    /// The batch so far, with `lost`; the packer starts an empty one.
    pub fn take(&mut self, lost: u64) -> FlowEvents {
        let next = FlowEvents {
            strings: vec![String::new()],
            flows: Vec::with_capacity(self.batch.flows.len()),
            lost: 0,
        };
        let mut b = std::mem::replace(&mut self.batch, next);
        b.lost = lost;
        self.index.clear();
        b
    }
}

impl FlowEvents {
    /// String `i` of the batch; empty for an index it does not have.
    pub fn string(&self, i: u32) -> &str {
        self.strings.get(i as usize).map_or("", String::as_str)
    }

    /// Event `i` with its strings.
    pub fn flow(&self, i: usize) -> Option<L7Flow> {
        let f = self.flows.get(i)?;
        let s = |k: u32| self.string(k).to_owned();
        Some(L7Flow {
            time_unix_nanos: f.time_unix_nanos,
            direction: f.direction,
            src_ip: s(f.src_ip),
            src_port: f.src_port,
            src_identity: f.src_identity,
            src_namespace: s(f.src_namespace),
            src_name: s(f.src_name),
            dst_ip: s(f.dst_ip),
            dst_port: f.dst_port,
            dst_identity: f.dst_identity,
            dst_namespace: s(f.dst_namespace),
            dst_name: s(f.dst_name),
            protocol: s(f.protocol),
            method: s(f.method),
            host: s(f.host),
            path: s(f.path),
            status: f.status,
            latency_micros: f.latency_micros,
            verdict: f.verdict,
            rule: s(f.rule),
            drop_reason: s(f.drop_reason),
            grpc_status: f.grpc_status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn flow(n: u32, path: &str) -> L7Flow {
        let allowed = n.is_multiple_of(2);
        L7Flow {
            time_unix_nanos: 1_700_000_000_000_000_000 + u64::from(n),
            direction: 1,
            src_ip: "10.1.0.7".into(),
            src_port: 40_000 + n,
            src_identity: 4242,
            src_namespace: "shop".into(),
            src_name: "client-7f9c".into(),
            dst_ip: "10.1.1.9".into(),
            dst_port: 8080,
            dst_identity: 5151,
            dst_namespace: "shop".into(),
            dst_name: "api-5d2b".into(),
            protocol: "HTTP/1.1".into(),
            method: "GET".into(),
            host: "api.shop".into(),
            path: path.into(),
            status: if allowed { 200 } else { 403 },
            latency_micros: 120 + u64::from(n),
            verdict: if allowed { 1 } else { 2 },
            rule: if allowed { "shop/api-read".into() } else { String::new() },
            drop_reason: if allowed { String::new() } else { "policy_denied".into() },
            grpc_status: 0,
        }
    }

    #[test]
    fn a_batch_reads_back_event_for_event_with_each_string_sent_once() {
        let mut p = Packer::new();
        let flows: Vec<L7Flow> = (0..64)
            .map(|n| flow(n, ["/public/a", "/admin"][n as usize % 2]))
            .collect();
        for f in &flows {
            p.push_flow(f);
        }
        assert_eq!(p.len(), 64);
        let batch = p.take(3);
        assert_eq!(batch.lost, 3);
        let wire = FlowEvents::decode(batch.encode_to_vec().as_slice()).unwrap();
        for (i, f) in flows.iter().enumerate() {
            assert_eq!(wire.flow(i).as_ref(), Some(f), "event {i}");
        }
        assert_eq!(wire.flow(64), None);
        // "", two addresses, shop, two pods, protocol, method, host, two
        // paths, a rule and a reason.
        assert_eq!(wire.strings.len(), 13, "{:?}", wire.strings);
        let mut sorted = wire.strings.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), wire.strings.len(), "a string sent twice");

        // Against every string in every event, what used to go.
        let unpacked: usize = flows.iter().map(|f| f.encoded_len() + 2).sum();
        assert!(
            wire.encoded_len() * 2 < unpacked,
            "packed {} bytes, unpacked {unpacked}",
            wire.encoded_len()
        );

        // The next batch starts empty: its own table, index 0 empty.
        assert!(p.is_empty());
        p.push_flow(&flow(1, "/other"));
        let next = p.take(0);
        assert_eq!(next.strings[0], "");
        assert_eq!(next.flow(0).unwrap().path, "/other");
        assert_eq!(next.lost, 0);
    }

    #[test]
    fn an_index_past_the_table_reads_as_empty() {
        let batch = FlowEvents {
            lost: 0,
            strings: vec![String::new(), "GET".into()],
            flows: vec![PackedFlow {
                method: 1,
                path: 99,
                host: u32::MAX,
                ..Default::default()
            }],
        };
        let f = batch.flow(0).unwrap();
        assert_eq!((f.method.as_str(), f.path.as_str(), f.host.as_str()), ("GET", "", ""));
    }
}
