//! `sinew-bench l7-match`: what the L7 matcher (`sinew-l7`) costs per
//! request with 1, 100 and 1,000 rules on a port, for exact paths, path
//! prefixes, path regexes and a mix with methods and headers. Pure CPU, no
//! lab: the baseline of each row is the same workload with one rule, so
//! the ratio says how the cost grows with the number of rules (issue 12
//! asks for ≥ 0.9x requests/s at 1,000 rules against 1).
//!
//! Requests cycle through a fixed list, half of which some rule allows and
//! half of which none does (a denied request visits every candidate, the
//! worst case). Each measurement runs for a fixed time and reports the
//! mean nanoseconds per `check`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use sinew_l7::{
    CompiledRules, GrpcRule, HeaderMatch, HeaderValue, HttpRule, L7Rules, Peer, PeerId, RuleSet, StringMatch,
};

use crate::report::{Better, Report, Row};
use crate::stats::Samples;

/// Rule counts measured; the first is the baseline.
pub const RULE_COUNTS: [usize; 3] = [1, 100, 1_000];

/// The shapes of rule lists measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Exact,
    Prefix,
    Regex,
    /// Exact, prefix and regex paths with methods, a header condition and
    /// gRPC rules, spread over rule sets for different peers.
    Mixed,
}

pub const WORKLOADS: [Workload; 4] = [Workload::Exact, Workload::Prefix, Workload::Regex, Workload::Mixed];

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Exact => "exact path",
            Workload::Prefix => "path prefix",
            Workload::Regex => "path regex",
            Workload::Mixed => "mixed",
        }
    }
}

/// One request of a workload: method, normalised path, whether it carries
/// the header, and whether it must be allowed.
pub struct Req {
    pub method: &'static str,
    pub path: String,
    pub header: bool,
    pub allowed: bool,
}

/// The rule sets of `n` rules of a workload.
pub fn rules(w: Workload, n: usize) -> Vec<RuleSet> {
    let http = |i: usize| -> HttpRule {
        match (w, i % 3) {
            (Workload::Exact, _) | (Workload::Mixed, 0) => HttpRule {
                method: (w == Workload::Mixed).then(|| StringMatch::Exact("GET".into())),
                path: Some(StringMatch::Exact(format!("/svc{i}/items"))),
                ..Default::default()
            },
            (Workload::Prefix, _) | (Workload::Mixed, 1) => HttpRule {
                path: Some(StringMatch::Prefix(format!("/api/v{i}/"))),
                headers: if w == Workload::Mixed {
                    vec![HeaderMatch {
                        name: "x-env".into(),
                        value: HeaderValue::Exact("prod".into()),
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            },
            _ => HttpRule {
                method: (w == Workload::Mixed).then(|| StringMatch::Regex("GET|HEAD".into())),
                path: Some(StringMatch::Regex(format!("/r{i}/[0-9]+/detail"))),
                ..Default::default()
            },
        }
    };
    if w != Workload::Mixed {
        return vec![RuleSet {
            peers: vec![Peer::Any],
            rules: L7Rules {
                http: (0..n).map(http).collect(),
                grpc: vec![],
            },
            rule: "bench".into(),
        }];
    }
    // Mixed: ten rule sets (or fewer), one for any peer.
    let sets = n.clamp(1, 10);
    (0..sets)
        .map(|s| {
            let mut rules = L7Rules::default();
            for i in (s..n).step_by(sets) {
                if i % 10 == 9 {
                    rules.grpc.push(GrpcRule {
                        service: format!("pkg.Svc{i}"),
                        method: Some("Get".into()),
                    });
                } else {
                    rules.http.push(http(i));
                }
            }
            if rules.is_empty() {
                rules.http.push(http(s));
            }
            RuleSet {
                // The measured peer (1001) is in every set, next to one of
                // its own, so each check pays the peer lookup.
                peers: if s == 0 {
                    vec![Peer::Any]
                } else {
                    vec![Peer::Identity(1000 + s as u32), Peer::Identity(1001)]
                },
                rules,
                rule: format!("bench set {s}"),
            }
        })
        .collect()
}

/// 256 requests for a workload of `n` rules, every other one allowed.
pub fn requests(w: Workload, n: usize) -> Vec<Req> {
    (0..256)
        .map(|k| {
            let i = (k * 7919) % n;
            let allowed = k % 2 == 0;
            let kind = if w == Workload::Mixed { i % 3 } else { w as usize };
            let grpc = w == Workload::Mixed && i % 10 == 9;
            // A miss: the same shape under a name no rule has.
            let tag = if allowed { i.to_string() } else { format!("x{i}") };
            let (method, path) = if grpc {
                ("POST", format!("/pkg.Svc{tag}/Get"))
            } else {
                match kind {
                    0 => ("GET", format!("/svc{tag}/items")),
                    1 => ("GET", format!("/api/v{tag}/users/42")),
                    _ => ("GET", format!("/r{tag}/{k}/detail")),
                }
            };
            Req {
                method,
                path,
                header: true,
                allowed,
            }
        })
        .collect()
}

/// Mean nanoseconds per check over `run_for`.
pub fn measure(c: &CompiledRules, reqs: &[Req], run_for: Duration) -> f64 {
    let with: [(&str, &str); 1] = [("x-env", "prod")];
    let without: [(&str, &str); 0] = [];
    let requests: Vec<sinew_l7::Request<'_>> = reqs
        .iter()
        .map(|r| sinew_l7::Request {
            method: r.method,
            path: &r.path,
            host: Some("api.example.com"),
            headers: if r.header { &with } else { &without },
        })
        .collect();
    let peer = PeerId::identity(1001);
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < run_for {
        for r in &requests {
            black_box(c.check(black_box(peer), black_box(r)));
        }
        done += requests.len() as u64;
    }
    start.elapsed().as_nanos() as f64 / done as f64
}

/// Every workload at every rule count, `reps` times, each run `run_for`
/// long; one row per workload and rule count above the first.
pub fn run(reps: u32, run_for: Duration, report: &mut Report) -> Result<(), sinew_l7::CompileError> {
    for w in WORKLOADS {
        let mut compiled = Vec::new();
        for n in RULE_COUNTS {
            let build = Instant::now();
            let c = CompiledRules::new(rules(w, n))?;
            report.notes.push(format!(
                "l7-match {}: {n} rules compiled in {:.1} ms",
                w.name(),
                build.elapsed().as_secs_f64() * 1e3
            ));
            compiled.push((n, c, requests(w, n)));
        }
        let mut samples: Vec<Samples> = vec![Samples::default(); RULE_COUNTS.len()];
        for _ in 0..reps {
            // Interleaved, so that every count sees the same machine.
            for (k, (_, c, reqs)) in compiled.iter().enumerate() {
                samples[k].values.push(measure(c, reqs, run_for));
            }
        }
        for (k, n) in RULE_COUNTS.iter().enumerate().skip(1) {
            report.rows.push(Row {
                scenario: "l7-match".into(),
                metric: format!("{}, {n} rules", w.name()),
                unit: "ns",
                better: Better::Lower,
                baseline: format!("{} rule", RULE_COUNTS[0]),
                baseline_samples: samples[0].clone(),
                sinew_samples: samples[k].clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every workload's requests get the verdict they are meant to, so the
    /// benchmark measures half allows and half denies.
    #[test]
    fn workloads_allow_exactly_the_requests_meant_to_be_allowed() {
        for w in WORKLOADS {
            for n in RULE_COUNTS {
                let c = CompiledRules::new(rules(w, n)).unwrap();
                assert!(c.len() >= n.min(10), "{w:?} {n}");
                for r in requests(w, n) {
                    let headers = [("x-env", "prod")];
                    let req = sinew_l7::Request {
                        method: r.method,
                        path: &r.path,
                        host: None,
                        headers: &headers,
                    };
                    let peer = PeerId::identity(1001);
                    assert_eq!(c.check(peer, &req).is_allowed(), r.allowed, "{w:?} {n} {}", r.path);
                }
            }
        }
    }
}
