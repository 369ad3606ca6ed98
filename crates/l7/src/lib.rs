//! Sinew's L7 policy logic, shared by `sinew-proxy` (which enforces it),
//! the agent (which validates and ships it) and `sinew policy trace`
//! (which explains it): the HTTP and gRPC rule types of
//! `toPorts[].rules` and their validation ([`rules`]), the one
//! normalisation of a request target that is both matched and forwarded
//! ([`path`]), and the compiled matcher that turns a request into a
//! verdict naming the rule that allowed it ([`matcher`]).
//!
//! ```text
//! L7Rules (YAML) --validate--> RuleSet{peers, rules, rule ref} --CompiledRules::new--> check(peer, Request) -> Verdict
//! raw target --normalize_target--> Target (path matched == path forwarded)
//! ```
//!
//! Everything here is a plain function or an immutable value: this crate
//! must never do I/O, keep state between calls, or panic on any input
//! (the [`fuzz`] entry points hold it to that).
#![forbid(unsafe_code)]

pub mod fuzz;
pub mod matcher;
pub mod path;
pub mod rules;
#[cfg(feature = "schema")]
mod schema;

pub use matcher::{CompileError, CompiledRules, Headers, Match, Peer, PeerId, Request, RuleKind, RuleSet, Verdict};
pub use path::{normalize_path, normalize_target, PathError, Target};
pub use rules::{GrpcRule, HeaderMatch, HeaderValue, HttpRule, L7Rules, RuleError, StringMatch, HTTP_METHODS};
