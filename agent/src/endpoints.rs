//! The endpoint registry: every pod interface this node serves, persisted
//! (atomically) so that a restarted agent knows what to re-attach and what
//! to clean up.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ipam::{write_atomic, Attachment};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot persist endpoints to {path}: {source}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("endpoint state {path} is corrupt ({reason}); move it away and restart the agent, then restart this node's pods")]
    Corrupt { path: PathBuf, reason: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: u32,
    pub attachment: Attachment,
    pub pod_namespace: String,
    pub pod_name: String,
    pub netns: String,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub ip: Ipv4Addr,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub identity: u32,
    /// The security labels `identity` was allocated for; a change of the
    /// pod's labels or namespace moves the endpoint to another identity.
    #[serde(default)]
    pub identity_labels: std::collections::BTreeMap<String, String>,
}

impl Endpoint {
    /// The endpoint-map row of the endpoint, without policy flags.
    pub fn map_info(&self) -> sinew_abi::EndpointInfo {
        sinew_abi::EndpointInfo {
            ipv4: u32::from_ne_bytes(self.ip.octets()),
            identity: self.identity,
            id: self.id,
            flags: 0,
            pod_mac: self.pod_mac,
            host_mac: self.host_mac,
            policy_rev: 0,
        }
    }
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    next_id: u32,
    endpoints: BTreeMap<String, Endpoint>,
    /// Host veths (name, ifindex) of deleted endpoints that the agent
    /// removes in the background after answering the DEL. Persisted with
    /// the endpoint's removal, so that an agent stopped or killed before
    /// the removal ran finishes it on restart instead of leaking the veth
    /// (the registry no longer names it, and the runtime's DEL succeeded).
    #[serde(default)]
    link_removals: BTreeMap<String, u32>,
}

pub struct Registry {
    path: PathBuf,
    state: State,
}

fn key(a: &Attachment) -> String {
    format!("{}/{}", a.container_id, a.ifname)
}

/// MAC text is formatted and parsed in one place for the whole project.
pub use sinew_proto::addr::{format_mac, parse_mac};

impl Registry {
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, RegistryError> {
        let path = path.into();
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| RegistryError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                next_id: 1,
                ..Default::default()
            },
            Err(source) => return Err(RegistryError::Persist { path, source }),
        };
        Ok(Self { path, state })
    }

    fn persist(&self) -> Result<(), RegistryError> {
        write_atomic(&self.path, &serde_json::to_vec_pretty(&self.state).expect("serializes")).map_err(|source| {
            RegistryError::Persist {
                path: self.path.clone(),
                source,
            }
        })
    }

    pub fn next_id(&mut self) -> u32 {
        let id = self.state.next_id.max(1);
        self.state.next_id = id.wrapping_add(1).max(1);
        id
    }

    pub fn insert(&mut self, ep: Endpoint) -> Result<(), RegistryError> {
        self.state.endpoints.insert(key(&ep.attachment), ep);
        self.persist()
    }

    pub fn remove(&mut self, att: &Attachment) -> Result<Option<Endpoint>, RegistryError> {
        let ep = self.state.endpoints.remove(&key(att));
        if ep.is_some() {
            self.persist()?;
        }
        Ok(ep)
    }

    /// Removes the endpoint and records its host veth as to be removed, in
    /// one write: see [`Self::link_removals`].
    pub fn remove_with_link(&mut self, att: &Attachment) -> Result<Option<Endpoint>, RegistryError> {
        let ep = self.state.endpoints.remove(&key(att));
        if let Some(ep) = &ep {
            self.state.link_removals.insert(ep.host_ifname.clone(), ep.host_ifindex);
            self.persist()?;
        }
        Ok(ep)
    }

    /// Host veths (name, ifindex) whose background removal may not have
    /// run yet.
    pub fn link_removals(&self) -> Vec<(String, u32)> {
        self.state.link_removals.iter().map(|(n, i)| (n.clone(), *i)).collect()
    }

    /// Forgets recorded veth removals that are done (or moot).
    pub fn forget_link_removals<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) -> Result<(), RegistryError> {
        let mut changed = false;
        for n in names {
            changed |= self.state.link_removals.remove(n).is_some();
        }
        if changed {
            self.persist()?;
        }
        Ok(())
    }

    pub fn get(&self, att: &Attachment) -> Option<&Endpoint> {
        self.state.endpoints.get(&key(att))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.state.endpoints.values()
    }

    pub fn len(&self) -> usize {
        self.state.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.state.endpoints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_bad_macs() {
        let m = parse_mac("0a:1B:02:ff:00:09").unwrap();
        assert_eq!(format_mac(&m), "0a:1b:02:ff:00:09");
        for bad in ["", "0a:1b:02:ff:00", "0a:1b:02:ff:00:09:10", "zz:1b:02:ff:00:09"] {
            assert!(parse_mac(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn endpoints_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("endpoints.json");
        let att = Attachment {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        {
            let mut r = Registry::open(&path).unwrap();
            let id = r.next_id();
            r.insert(Endpoint {
                id,
                attachment: att.clone(),
                pod_namespace: "default".into(),
                pod_name: "p".into(),
                netns: "/run/netns/x".into(),
                host_ifname: "lxc1".into(),
                host_ifindex: 7,
                ip: "10.0.0.2".parse().unwrap(),
                pod_mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
                identity: 5,
                identity_labels: Default::default(),
            })
            .unwrap();
        }
        let mut r = Registry::open(&path).unwrap();
        assert_eq!(r.get(&att).unwrap().host_ifindex, 7);
        assert_eq!(r.next_id(), 2, "ids are not reused after restart");
        assert!(r.remove_with_link(&att).unwrap().is_some());
        assert!(r.remove(&att).unwrap().is_none());
        // The pending veth removal survives a restart until forgotten.
        let mut r = Registry::open(&path).unwrap();
        assert_eq!(r.link_removals(), vec![("lxc1".to_string(), 7)]);
        r.forget_link_removals(["lxc1"]).unwrap();
        assert!(Registry::open(&path).unwrap().link_removals().is_empty());
    }
}
