//! What the service maps must hold for a set of frontends, with stable
//! ids for frontends and backends. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use sinew_abi::{LbBackend, LbMaglevKey, LbSlotKey, LbSvcKey, LbSvcValue};
use sinew_model::LbAlgorithm;

use super::{maglev, Backend, BackendState, Frontend, Service};

/// What the service maps must hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    pub services: BTreeMap<LbSvcKey, LbSvcValue>,
    pub slots: BTreeMap<LbSlotKey, u32>,
    pub backends: BTreeMap<u32, LbBackend>,
    pub maglev: BTreeMap<LbMaglevKey, u32>,
}

/// Stable numbers for frontends and backends. A backend's id belongs to
/// one frontend (so its row can say whether that service may pick it).
/// Freed numbers are reused, lowest first.
#[derive(Debug, Default)]
pub struct Ids {
    pub services: BTreeMap<Frontend, u32>,
    pub backends: BTreeMap<(u32, Ipv4Addr, u16), u32>,
    used_services: BTreeSet<u32>,
    used_backends: BTreeSet<u32>,
    /// No free id is below these.
    next_service: u32,
    next_backend: u32,
}

/// The lowest id at or above `*hint` not in `used`, taken.
fn take_lowest(used: &mut BTreeSet<u32>, hint: &mut u32) -> u32 {
    let mut id = (*hint).max(1);
    while used.contains(&id) {
        id += 1;
    }
    used.insert(id);
    *hint = id + 1;
    id
}

impl Ids {
    fn service(&mut self, f: Frontend) -> u32 {
        if let Some(id) = self.services.get(&f) {
            return *id;
        }
        let id = take_lowest(&mut self.used_services, &mut self.next_service);
        self.services.insert(f, id);
        id
    }

    fn backend(&mut self, svc: u32, addr: Ipv4Addr, port: u16) -> u32 {
        if let Some(id) = self.backends.get(&(svc, addr, port)) {
            return *id;
        }
        let id = take_lowest(&mut self.used_backends, &mut self.next_backend);
        self.backends.insert((svc, addr, port), id);
        id
    }

    pub(super) fn adopt_service(&mut self, f: Frontend, id: u32) {
        self.services.insert(f, id);
        self.used_services.insert(id);
    }

    pub(super) fn adopt_backend(&mut self, key: (u32, Ipv4Addr, u16), id: u32) {
        self.backends.insert(key, id);
        self.used_backends.insert(id);
    }

    /// Forgets the ids nothing in `c` uses.
    pub(super) fn retain(&mut self, c: &Compiled) {
        let svc_ids: BTreeSet<u32> = c.services.values().map(|v| v.svc_id).collect();
        self.services.retain(|_, id| svc_ids.contains(id));
        self.backends.retain(|_, id| c.backends.contains_key(id));
        self.used_services = self.services.values().copied().collect();
        self.used_backends = self.backends.values().copied().collect();
        self.next_service = 1;
        self.next_backend = 1;
    }
}

/// The map contents for `want`, allocating ids as needed.
pub fn compile(want: &BTreeMap<Frontend, Service>, ids: &mut Ids, maglev_table_size: u32) -> Compiled {
    let mut c = Compiled::default();
    for (f, svc) in want {
        let svc_id = ids.service(*f);
        let usable: Vec<&Backend> = svc.usable().collect();
        let mut slot_ids = Vec::new();
        for b in &usable {
            let id = ids.backend(svc_id, b.addr, b.port);
            let mut flags = sinew_abi::LB_BE_F_ACTIVE;
            if b.state == BackendState::ServingTerminating {
                flags |= sinew_abi::LB_BE_F_TERMINATING;
            }
            c.backends.insert(
                id,
                LbBackend {
                    addr: u32::from_ne_bytes(b.addr.octets()),
                    port: b.port.to_be(),
                    proto: f.proto.number(),
                    flags,
                    svc_id,
                    pad: 0,
                },
            );
            slot_ids.push(id);
        }
        for (i, id) in slot_ids.iter().enumerate() {
            c.slots.insert(
                LbSlotKey {
                    svc_id,
                    slot: i as u32 + 1,
                },
                *id,
            );
        }
        let mut flags = 0;
        if svc.affinity_timeout.is_some() {
            flags |= sinew_abi::LB_F_AFFINITY;
        }
        if svc.local_only {
            flags |= sinew_abi::LB_F_LOCAL_ONLY;
        }
        if svc.algorithm == LbAlgorithm::Maglev {
            flags |= sinew_abi::LB_F_MAGLEV;
            let names: Vec<String> = usable.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
            for (index, which) in maglev::table(&names, maglev_table_size).into_iter().enumerate() {
                c.maglev.insert(
                    LbMaglevKey {
                        svc_id,
                        index: index as u32,
                    },
                    slot_ids[which],
                );
            }
        }
        c.services.insert(
            f.key(),
            LbSvcValue {
                svc_id,
                count: u16::try_from(usable.len()).unwrap_or(u16::MAX),
                flags,
                affinity_timeout: svc.affinity_timeout.unwrap_or(0),
                pad: 0,
            },
        );
    }
    c
}

#[cfg(test)]
mod tests {
    use super::super::desired;
    use super::super::fixtures::*;
    use super::*;
    use sinew_model::Protocol;

    #[test]
    fn compile_gives_slots_backends_and_a_maglev_table() {
        let y = WEB.replace(
            "metadata: {name: web, namespace: prod}",
            "metadata: {name: web, namespace: prod, annotations: {service.sinew.io/lb-algorithm: maglev}}",
        );
        let (d, _) = desired(&snap(&y), &settings());
        let mut ids = Ids::default();
        let c = compile(&d, &mut ids, 251);
        assert_eq!(c.services.len(), 6);
        let key = fe("10.96.0.10", 80, Protocol::Tcp).key();
        let v = c.services[&key];
        assert_eq!(v.count, 2);
        assert_ne!(v.flags & sinew_abi::LB_F_MAGLEV, 0);
        for slot in 1..=2 {
            let id = c.slots[&LbSlotKey { svc_id: v.svc_id, slot }];
            assert_eq!(c.backends[&id].svc_id, v.svc_id);
        }
        let table: Vec<u32> = (0..251)
            .map(|i| {
                c.maglev[&LbMaglevKey {
                    svc_id: v.svc_id,
                    index: i,
                }]
            })
            .collect();
        assert!(table.iter().all(|id| c.backends.contains_key(id)));
        // The same input compiles to the same output with the same ids.
        assert_eq!(compile(&d, &mut ids, 251), c);
    }

    /// Ten thousand services (the benchmark's largest size) compile in
    /// time linear in their number: prints how long it took, asserts only
    /// the result.
    #[test]
    fn ten_thousand_services_compile() {
        let mut y = String::new();
        for i in 0..10_000u32 {
            let (a, b) = (i / 250, i % 250 + 1);
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{clusterIP: 10.97.{a}.{b}, ports: [{{name: p, port: 80}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: p, port: 8080}}]\nendpoints: [{{addresses: [10.245.{a}.{b}], nodeName: node1}}]\n"
            ));
        }
        let t = std::time::Instant::now();
        let snap = snap(&y);
        let parsed = t.elapsed();
        let (d, _) = desired(&snap, &settings());
        let mut ids = Ids::default();
        let c = compile(&d, &mut ids, 251);
        println!(
            "10000 services: parse {parsed:?}, desired+compile {:?}",
            t.elapsed() - parsed
        );
        assert_eq!(
            (c.services.len(), c.backends.len(), c.slots.len()),
            (10_000, 10_000, 10_000)
        );
        let ids: BTreeSet<u32> = c.services.values().map(|v| v.svc_id).collect();
        assert_eq!((ids.first(), ids.last()), (Some(&1), Some(&10_000)), "dense ids");
    }
}
