//! The agent's network policy, in the order it flows: [`desired`] turns the
//! snapshot's policy documents, identities and local endpoints into each
//! endpoint's resolved policy; [`compile`] turns that into policy-map
//! entries (pure); [`apply`] writes the difference into the datapath in an
//! order that no packet sees a state that neither the old nor the new
//! policy has (new and changed entries first, then endpoint flags, then
//! removals); [`api`] answers apply, list, delete, trace and the identity
//! list. None of them knows the node state: each takes what it reads as
//! arguments, and the node state calls them.

pub mod api;
pub mod apply;
pub mod compile;
pub mod desired;

use std::collections::{BTreeMap, BTreeSet};

use ipnet::Ipv4Net;
use sinew_abi::{PolicyKey, PolicyValue};
use sinew_policy::Resolved;

pub use api::{ApplyError, TraceError};
pub use compile::{cidr_flags, compile, diff, port_prefixes, proto_number, Diff, RuleTable};
pub use desired::policies_in_force;

/// The agent's policy state: parsed policies, CIDR numbers, what the
/// policy map holds, and each endpoint's enforcement flags and revision.
pub struct PolicyState {
    pub(super) generation: u64,
    pub resources: Vec<sinew_policy::PolicyResource>,
    /// Invalid policy documents in the datastore (they do not apply).
    pub errors: Vec<String>,
    /// A node-local number for every IPv4 prefix a policy names, excepts
    /// included: the CIDR class of the addresses it is the most specific
    /// named prefix of (all of them: `sinew_cidr_class`), and the identity
    /// of those outside the cluster (see `cidr_identities`). Numbers stay
    /// while their prefix is named, across restarts too.
    pub cidr_ids: BTreeMap<Ipv4Net, u32>,
    pub(super) next_cidr_id: u32,
    /// What `sinew_cidr_class` holds.
    pub(super) cidr_classes: BTreeMap<Ipv4Net, u32>,
    pub rules: RuleTable,
    pub resolved: BTreeMap<u32, Resolved>,
    pub(super) entries: BTreeMap<PolicyKey, PolicyValue>,
    pub(super) ep_state: BTreeMap<u32, (u32, u32)>,
    /// Endpoints whose entries do not fit: they fail closed, or run
    /// without policy with `fail_open`.
    pub failed: BTreeSet<u32>,
    /// `--policy-fail-open`: an endpoint whose entries do not fit runs
    /// unenforced instead of dropping everything.
    pub fail_open: bool,
    /// The proxy's listeners (`--proxy-ports`): entries with L7 rules carry
    /// the one for their direction, and the datapath hands their
    /// connections to it.
    pub proxy_ports: crate::proxy_redirect::ProxyPorts,
    /// Where the proxy's snapshots go (the rules of every apply).
    pub proxy: Option<std::sync::Arc<crate::proxy::Publisher>>,
    /// Map writes refused (table full), ever.
    pub overflows: u64,
    /// Where the policy documents in force are kept for the next start
    /// (`--state-dir`), and a hash of what was written there last (a hash,
    /// not a copy: the snapshot already holds every document, and at 500
    /// policies a copy is a few hundred KB more). It starts as the hash of
    /// no documents, so that an empty first snapshot leaves the file of
    /// the agent before alone, as the copy did.
    pub persist: Option<std::path::PathBuf>,
    pub(super) persisted: u64,
}

impl Default for PolicyState {
    fn default() -> Self {
        Self {
            generation: 0,
            resources: Vec::new(),
            errors: Vec::new(),
            cidr_ids: BTreeMap::new(),
            next_cidr_id: sinew_policy::identity::MIN_CIDR_IDENTITY,
            cidr_classes: BTreeMap::new(),
            rules: RuleTable::default(),
            resolved: BTreeMap::new(),
            entries: BTreeMap::new(),
            ep_state: BTreeMap::new(),
            failed: BTreeSet::new(),
            fail_open: false,
            proxy_ports: crate::proxy_redirect::ProxyPorts::default(),
            proxy: None,
            overflows: 0,
            persist: None,
            persisted: desired::docs_hash(&[]),
        }
    }
}

/// Idle conntrack entries to remove: closing TCP after 10 s, other TCP after
/// 6 h, everything else after 60 s.
pub fn ct_expired(key: &sinew_abi::CtKey, e: &sinew_abi::CtEntry, now_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(e.last_seen_ns);
    let limit = if e.flags & sinew_abi::CT_F_CLOSING != 0 {
        10
    } else if key.proto == 6 {
        6 * 3600
    } else {
        60
    };
    idle > limit * 1_000_000_000
}
