//! The services this node has applied: writes the difference between what
//! the maps hold and what they must hold, in an order that never shows a
//! service pointing at a missing backend.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{compile, Backend, Compiled, Frontend, Ids, Service};
use crate::datapath::{Datapath, DatapathError, LbEntries};

/// The services this node has applied, and their ids.
#[derive(Debug, Default)]
pub struct ServiceState {
    pub(super) ids: Ids,
    /// What the maps hold, as last written (or read at start).
    applied: Compiled,
    /// The frontends in force, for `sinew service list`.
    pub in_force: BTreeMap<Frontend, Service>,
    /// Problems found computing them (claimed frontends).
    pub errors: Vec<String>,
    /// Map writes and deletes since the agent started.
    pub map_writes: u64,
}

impl ServiceState {
    /// Takes over what an earlier agent left in the pinned maps, so that
    /// its ids (and with them Maglev tables and affinity) stay and the
    /// first apply writes only what really changed.
    pub fn adopt(entries: LbEntries) -> Self {
        let mut s = ServiceState::default();
        for (k, v) in &entries.services {
            if let Some(f) = Frontend::from_key(k) {
                s.ids.adopt_service(f, v.svc_id);
            }
            s.applied.services.insert(*k, *v);
        }
        for (id, be) in &entries.backends {
            let addr = Ipv4Addr::from(be.addr.to_ne_bytes());
            s.ids.adopt_backend((be.svc_id, addr, u16::from_be(be.port)), *id);
            s.applied.backends.insert(*id, *be);
        }
        s.applied.slots = entries.slots.into_iter().collect();
        s.applied.maglev = entries.maglev.into_iter().collect();
        s
    }

    pub fn svc_id(&self, f: &Frontend) -> Option<u32> {
        self.ids.services.get(f).copied()
    }

    pub fn backend_id(&self, svc_id: u32, b: &Backend) -> Option<u32> {
        self.ids.backends.get(&(svc_id, b.addr, b.port)).copied()
    }

    /// Brings the maps to `want`: new and changed backends, Maglev entries
    /// and slots, then service entries, then removals of services, slots,
    /// Maglev entries and backends. A service entry therefore never names
    /// a slot or backend that is not there yet, or no longer there.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        want: BTreeMap<Frontend, Service>,
        errors: Vec<String>,
        maglev_table_size: u32,
    ) -> Result<(), DatapathError> {
        let c = compile(&want, &mut self.ids, maglev_table_size);
        let old = std::mem::take(&mut self.applied);
        let mut now = old.clone();
        let writes = &mut self.map_writes;
        let result = (|| {
            upsert_changed(&c.backends, &old.backends, &mut now.backends, writes, |k, v| {
                dp.upsert_lb_backend(k, v)
            })?;
            upsert_changed(&c.maglev, &old.maglev, &mut now.maglev, writes, |k, v| {
                dp.upsert_lb_maglev(k, v)
            })?;
            upsert_changed(&c.slots, &old.slots, &mut now.slots, writes, |k, v| {
                dp.upsert_lb_slot(k, v)
            })?;
            upsert_changed(&c.services, &old.services, &mut now.services, writes, |k, v| {
                dp.upsert_lb_service(k, v)
            })?;
            remove_gone(&c.services, &old.services, &mut now.services, writes, |k| {
                dp.remove_lb_service(k)
            })?;
            remove_gone(&c.slots, &old.slots, &mut now.slots, writes, |k| dp.remove_lb_slot(k))?;
            remove_gone(&c.maglev, &old.maglev, &mut now.maglev, writes, |k| {
                dp.remove_lb_maglev(k)
            })?;
            remove_gone(&c.backends, &old.backends, &mut now.backends, writes, |k| {
                dp.remove_lb_backend(k)
            })
        })();
        self.applied = now;
        result?;
        self.ids.retain(&c);
        self.in_force = want;
        self.errors = errors;
        Ok(())
    }
}

/// Writes each entry of `want` that `old` lacks or holds otherwise, and
/// records it in `now` (what the map holds) once written.
fn upsert_changed<K: Ord + Copy, V: PartialEq + Copy>(
    want: &BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
    now: &mut BTreeMap<K, V>,
    writes: &mut u64,
    mut put: impl FnMut(K, V) -> Result<(), DatapathError>,
) -> Result<(), DatapathError> {
    for (k, v) in want {
        if old.get(k) != Some(v) {
            put(*k, *v)?;
            now.insert(*k, *v);
            *writes += 1;
        }
    }
    Ok(())
}

/// Removes each entry of `old` that `want` no longer has, and from `now`
/// once removed.
fn remove_gone<K: Ord + Copy, V>(
    want: &BTreeMap<K, V>,
    old: &BTreeMap<K, V>,
    now: &mut BTreeMap<K, V>,
    writes: &mut u64,
    mut del: impl FnMut(K) -> Result<(), DatapathError>,
) -> Result<(), DatapathError> {
    for k in old.keys().filter(|k| !want.contains_key(k)) {
        del(*k)?;
        now.remove(k);
        *writes += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::desired;
    use super::super::fixtures::*;
    use super::*;

    #[test]
    fn adopted_state_keeps_ids() {
        let (d, _) = desired(&snap(WEB), &settings());
        let mut ids = Ids::default();
        let c = compile(&d, &mut ids, 251);
        let s = ServiceState::adopt(LbEntries {
            services: c.services.iter().map(|(k, v)| (*k, *v)).collect(),
            slots: c.slots.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: c.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            maglev: c.maglev.iter().map(|(k, v)| (*k, *v)).collect(),
        });
        let mut adopted = s.ids;
        assert_eq!(compile(&d, &mut adopted, 251), c);
    }
}
