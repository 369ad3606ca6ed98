//! Typed handles on the pinned maps: one hash type and one LPM trie type,
//! each knowing its map's name, so that every write, removal and listing
//! reports errors the same way and treats a missing entry the same way.

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData};
use aya::{Ebpf, Pod};
use sinew_abi::{IpcacheData, IpcacheKey, PolicyData, PolicyKey};

use super::error::DatapathError;

pub(crate) fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        map,
        source: Box::new(source),
    }
}

/// Takes map `name` out of a loaded object (each map once).
pub(crate) fn take(obj: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    obj.take_map(name).ok_or(DatapathError::Map {
        map: name,
        source: Box::new(aya::maps::MapError::InvalidName { name: name.to_string() }),
    })
}

/// Deleting an entry that is already gone is success: aya reports the
/// kernel's ENOENT from `bpf_map_delete_elem` as a syscall error, not as
/// `KeyNotFound`, and taking it for a failure wedged the ipcache
/// reconciler after a pod's DEL had removed its entry first.
pub(crate) fn ignore_missing(r: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), DatapathError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) | Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32) =>
        {
            Ok(())
        }
        Err(e) => Err(map_err(map)(e)),
    }
}

/// A pinned `BPF_MAP_TYPE_HASH` of `K` to `V`.
pub struct PinnedHash<K: Pod, V: Pod> {
    name: &'static str,
    map: BpfHashMap<MapData, K, V>,
}

impl<K: Pod, V: Pod> PinnedHash<K, V> {
    /// Takes map `name` out of `obj`; fails when its type or sizes differ.
    pub fn take(obj: &mut Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        let map = BpfHashMap::try_from(take(obj, name)?).map_err(map_err(name))?;
        Ok(Self { name, map })
    }

    pub fn upsert(&mut self, key: K, value: V) -> Result<(), DatapathError> {
        self.map.insert(key, value, 0).map_err(map_err(self.name))
    }

    /// Removes `key`; an entry already gone counts as removed.
    pub fn remove(&mut self, key: &K) -> Result<(), DatapathError> {
        ignore_missing(self.map.remove(key), self.name)
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.map.get(key, 0).ok()
    }

    /// Every entry (read while the datapath may change it).
    pub fn entries(&self) -> Vec<(K, V)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    pub fn keys(&self) -> Vec<K> {
        self.map.keys().filter_map(Result::ok).collect()
    }

    pub fn len(&self) -> usize {
        self.map.keys().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A key of an LPM trie map as the ABI spells it: the prefix length and
/// the data after it, which aya's `lpm_trie::Key` keeps apart.
pub trait LpmKeyed: Copy {
    type Data: Pod;
    fn prefix_len(&self) -> u32;
    fn data(&self) -> Self::Data;
    fn from_parts(prefix_len: u32, data: Self::Data) -> Self;
}

impl LpmKeyed for IpcacheKey {
    type Data = IpcacheData;
    fn prefix_len(&self) -> u32 {
        self.prefixlen
    }
    fn data(&self) -> IpcacheData {
        IpcacheKey::data(self)
    }
    fn from_parts(prefix_len: u32, data: IpcacheData) -> Self {
        IpcacheKey::from_parts(prefix_len, data)
    }
}

impl LpmKeyed for PolicyKey {
    type Data = PolicyData;
    fn prefix_len(&self) -> u32 {
        self.prefixlen
    }
    fn data(&self) -> PolicyData {
        PolicyKey::data(self)
    }
    fn from_parts(prefix_len: u32, data: PolicyData) -> Self {
        PolicyKey::from_parts(prefix_len, data)
    }
}

/// A pinned `BPF_MAP_TYPE_LPM_TRIE` keyed by `K` (with its prefix length).
pub struct PinnedLpm<K: LpmKeyed, V: Pod> {
    name: &'static str,
    map: LpmTrie<MapData, K::Data, V>,
}

impl<K: LpmKeyed, V: Pod> PinnedLpm<K, V> {
    /// Takes map `name` out of `obj`; fails when its type or sizes differ.
    pub fn take(obj: &mut Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        let map = LpmTrie::try_from(take(obj, name)?).map_err(map_err(name))?;
        Ok(Self { name, map })
    }

    pub fn upsert(&mut self, key: K, value: V) -> Result<(), DatapathError> {
        self.map
            .insert(&LpmKey::new(key.prefix_len(), key.data()), value, 0)
            .map_err(map_err(self.name))
    }

    /// Removes `key`; an entry already gone counts as removed.
    pub fn remove(&mut self, key: &K) -> Result<(), DatapathError> {
        ignore_missing(self.map.remove(&LpmKey::new(key.prefix_len(), key.data())), self.name)
    }

    /// Every entry, for reconciliation after a restart.
    pub fn entries(&self) -> Vec<(K, V)> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (K::from_parts(k.prefix_len(), k.data()), v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleting_a_missing_entry_is_success_and_other_errors_are_not() {
        let syscall = |errno: nix::errno::Errno| {
            Err(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::Error::from_raw_os_error(errno as i32),
            }))
        };
        let map = sinew_abi::maps::IPCACHE;
        assert!(ignore_missing(syscall(nix::errno::Errno::ENOENT), map).is_ok());
        assert!(ignore_missing(Err(aya::maps::MapError::KeyNotFound), map).is_ok());
        let e = ignore_missing(syscall(nix::errno::Errno::EPERM), map).unwrap_err();
        assert!(e.to_string().contains(map), "{e}");
    }
}
