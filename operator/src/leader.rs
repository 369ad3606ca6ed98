//! Leader election on a `coordination.k8s.io/v1` Lease: one operator acts,
//! the others wait. [`decide`] is the pure rule; [`Elector`] does the reads
//! and writes. A write carries the Lease's resourceVersion, so two
//! candidates racing for an expired lease cannot both win: the loser gets a
//! 409 and follows.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// The Lease as the rule needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    /// Microseconds since the epoch.
    pub renewed_us: Option<i64>,
    pub duration_secs: i64,
}

/// What a candidate does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No lease yet: create it, holding it.
    Create,
    /// Take it over (expired, or released): a new holder.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it until then (microseconds since the epoch).
    Follow { holder: String, until_us: i64 },
}

/// The rule: hold while renewing in time; take over a lease that has no
/// holder or has not been renewed for its duration.
pub fn decide(lease: Option<&LeaseView>, me: &str, now_us: i64) -> Decision {
    let Some(l) = lease else {
        return Decision::Create;
    };
    match l.holder.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(h) => {
            let until_us = l
                .renewed_us
                .unwrap_or(0)
                .saturating_add(l.duration_secs.saturating_mul(1_000_000));
            if now_us >= until_us {
                Decision::Acquire
            } else {
                Decision::Follow {
                    holder: h.to_string(),
                    until_us,
                }
            }
        }
    }
}

pub fn view(lease: &Lease) -> LeaseView {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity,
        renewed_us: spec.renew_time.or(spec.acquire_time).map(|t| t.0.as_microsecond()),
        duration_secs: i64::from(spec.lease_duration_seconds.unwrap_or(15)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{name}: {source}; check the operator's RBAC for coordination.k8s.io leases and that the API server is reachable")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// One candidate's view of one Lease.
pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    me: String,
    duration: Duration,
}

impl Elector {
    pub fn new(api: Api<Lease>, namespace: &str, name: &str, me: &str, duration: Duration) -> Elector {
        Elector {
            api,
            namespace: namespace.into(),
            name: name.into(),
            me: me.into(),
            duration,
        }
    }

    fn err(&self, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// One round: read, decide, write. True when this candidate holds the
    /// lease afterwards. A conflict (another candidate wrote first) is
    /// "not leader", not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await.map_err(|e| self.err(e))?;
        let decision = decide(current.as_ref().map(view).as_ref(), &self.me, now.as_microsecond());
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let result = match (decision, current) {
            (Decision::Follow { .. }, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.me.clone()),
                        lease_duration_seconds: Some(secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await.map(drop)
            }
            (d, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                if d == Decision::Acquire {
                    spec.holder_identity = Some(self.me.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(secs);
                // replace carries metadata.resourceVersion: optimistic concurrency.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(drop)
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_s: i64) -> LeaseView {
        LeaseView {
            holder: holder.map(str::to_string),
            renewed_us: Some(renewed_s * 1_000_000),
            duration_secs: 15,
        }
    }

    #[test]
    fn the_rule() {
        assert_eq!(decide(None, "a", 0), Decision::Create);
        assert_eq!(decide(Some(&lease(Some("a"), 100)), "a", 200_000_000), Decision::Renew);
        assert_eq!(
            decide(Some(&lease(Some("b"), 100)), "a", 114_999_999),
            Decision::Follow {
                holder: "b".into(),
                until_us: 115_000_000
            }
        );
        assert_eq!(
            decide(Some(&lease(Some("b"), 100)), "a", 115_000_000),
            Decision::Acquire
        );
        assert_eq!(decide(Some(&lease(None, 100)), "a", 0), Decision::Acquire);
    }
}
