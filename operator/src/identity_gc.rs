//! Identity GC: the operator alone deletes `SinewIdentity` objects, those
//! that no pod (through its namespace's labels and its own) and no
//! published endpoint has referenced for a grace period. A pure function
//! over what the API holds and the operator's memory of when each identity
//! was first seen unused.
//!
//! Why a grace period on both sides: an agent creates the identity before
//! the pod's endpoint is published, and a new pod of an old label set may
//! be scheduled just as the last one goes; an identity younger than the
//! grace period, or unused for less than it, stays.

use std::collections::{BTreeMap, BTreeSet};

use sinew_policy::identity::{identity_labels, IgnoreRules};

/// An identity as GC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFacts {
    pub id: u32,
    pub labels: BTreeMap<String, String>,
    /// Creation time, seconds since the epoch (None: unknown, treated as new).
    pub created: Option<i64>,
}

/// A pod as GC sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
}

/// What the operator remembers between runs: when each identity was first
/// seen unused. Lost on restart, which only delays GC by one grace period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcMemory {
    pub unused_since: BTreeMap<u32, i64>,
}

/// The outcome of one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Delete these.
    pub delete: Vec<u32>,
    /// Unused but within the grace period.
    pub waiting: usize,
    pub in_use: usize,
}

/// The identities pods reference now (by their label sets) and the ones
/// published endpoints carry.
pub fn referenced(
    identities: &[IdentityFacts],
    pods: &[PodFacts],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    endpoint_identities: &BTreeSet<u32>,
    ignore: &IgnoreRules,
) -> BTreeSet<u32> {
    let by_labels: BTreeMap<&BTreeMap<String, String>, u32> = identities.iter().map(|i| (&i.labels, i.id)).collect();
    let empty = BTreeMap::new();
    let mut out: BTreeSet<u32> = endpoint_identities.clone();
    for p in pods {
        let ns_labels = namespaces.get(&p.namespace).unwrap_or(&empty);
        let want = identity_labels(&p.namespace, &p.labels, ns_labels, p.service_account.as_deref(), ignore);
        if let Some(id) = by_labels.get(&want) {
            out.insert(*id);
        }
    }
    out
}

/// Decides what to delete at `now` (seconds since the epoch) and updates
/// `memory`.
pub fn plan(
    memory: &mut GcMemory,
    identities: &[IdentityFacts],
    in_use: &BTreeSet<u32>,
    now: i64,
    grace_secs: i64,
) -> GcPlan {
    let mut out = GcPlan::default();
    let present: BTreeSet<u32> = identities.iter().map(|i| i.id).collect();
    memory
        .unused_since
        .retain(|id, _| present.contains(id) && !in_use.contains(id));
    for i in identities {
        if in_use.contains(&i.id) {
            out.in_use += 1;
            continue;
        }
        let since = *memory.unused_since.entry(i.id).or_insert(now);
        let old_enough = i.created.is_some_and(|c| now - c >= grace_secs);
        if old_enough && now - since >= grace_secs {
            out.delete.push(i.id);
        } else {
            out.waiting += 1;
        }
    }
    for id in &out.delete {
        memory.unused_since.remove(id);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn ident(id: u32, app: &str, created: i64) -> IdentityFacts {
        IdentityFacts {
            id,
            labels: labels(&[("app", app), ("sinew.io/namespace", "prod"), ("sinew.io/ns.team", "a")]),
            created: Some(created),
        }
    }

    fn pod(app: &str) -> PodFacts {
        PodFacts {
            namespace: "prod".into(),
            labels: labels(&[("app", app), ("pod-template-hash", "abc")]),
            service_account: None,
        }
    }

    #[test]
    fn pods_reference_identities_through_their_labels_and_namespace() {
        let ids = [ident(300, "web", 0), ident(301, "db", 0)];
        let ns = BTreeMap::from([("prod".to_string(), labels(&[("team", "a")]))]);
        let refs = referenced(&ids, &[pod("web")], &ns, &BTreeSet::new(), &IgnoreRules::default());
        assert_eq!(refs, BTreeSet::from([300]));
        // A namespace label change makes it another identity.
        let ns = BTreeMap::from([("prod".to_string(), labels(&[("team", "b")]))]);
        let refs = referenced(
            &ids,
            &[pod("web")],
            &ns,
            &BTreeSet::from([301]),
            &IgnoreRules::default(),
        );
        assert_eq!(refs, BTreeSet::from([301]));
    }

    #[test]
    fn unused_identities_go_after_the_grace_period_only() {
        let mut mem = GcMemory::default();
        let ids = [ident(300, "web", 0), ident(301, "db", 0)];
        let used = BTreeSet::from([300]);
        let p = plan(&mut mem, &ids, &used, 1000, 60);
        assert_eq!((p.delete.clone(), p.waiting, p.in_use), (vec![], 1, 1));
        let p = plan(&mut mem, &ids, &used, 1059, 60);
        assert!(p.delete.is_empty());
        let p = plan(&mut mem, &ids, &used, 1060, 60);
        assert_eq!(p.delete, [301]);
        assert!(mem.unused_since.is_empty());
    }

    #[test]
    fn reuse_resets_the_clock() {
        let mut mem = GcMemory::default();
        let ids = [ident(301, "db", 0)];
        plan(&mut mem, &ids, &BTreeSet::new(), 1000, 60);
        plan(&mut mem, &ids, &BTreeSet::from([301]), 1030, 60);
        let p = plan(&mut mem, &ids, &BTreeSet::new(), 1070, 60);
        assert!(p.delete.is_empty(), "unused only since 1070");
        let p = plan(&mut mem, &ids, &BTreeSet::new(), 1130, 60);
        assert_eq!(p.delete, [301]);
    }

    #[test]
    fn young_or_undated_identities_stay() {
        let mut mem = GcMemory::default();
        let young = ident(302, "new", 990);
        let undated = IdentityFacts {
            created: None,
            ..ident(303, "x", 0)
        };
        plan(&mut mem, &[young.clone(), undated.clone()], &BTreeSet::new(), 1000, 60);
        let p = plan(&mut mem, &[young, undated], &BTreeSet::new(), 1061, 60);
        // 302 was created at 990: 71 s old and unused for 61 s.
        assert_eq!(p.delete, [302]);
        assert_eq!(p.waiting, 1);
    }
}
