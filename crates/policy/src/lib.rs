//! Sinew's network policy logic: parsing and validating Kubernetes
//! `NetworkPolicy` and Sinew's `SinewNetworkPolicy` /
//! `SinewClusterwideNetworkPolicy`, selecting the policies that apply to an
//! endpoint, resolving their peers to concrete identities, and tracing the
//! verdict for one flow. The agent compiles [`resolve()`]'s output into BPF
//! maps; `sinew policy trace` runs [`trace()`] on the same output. Everything
//! here is a plain function: this crate must never do I/O, touch BPF or
//! netlink, or keep state between calls.
//!
//! ```text
//! parse(yaml) -> [PolicyResource] --resolve(endpoint, identities)--> Resolved --trace(flow)--> Trace
//!                                                                    Resolved --trace_l7(flow, request)--> L7Trace
//! ```
//!
//! L7 rules (`toPorts[].rules`) are validated here with `sinew-l7`'s
//! types; resolution decides which entries redirect to the proxy
//! ([`Entry::redirects`]) and with which rules ([`Resolved::l7_rule_sets`]).
#![forbid(unsafe_code)]

pub mod identity;
pub mod model;
pub mod resolve;
pub mod selector;
pub mod trace;

#[cfg(test)]
mod l7_scenarios;
#[cfg(test)]
mod scenarios;

pub use identity::{identity_labels, Identity, IdentityKind, IgnoreRules, NamedPorts, Reserved};
pub use model::{
    parse, parse_all, parse_documents, Direction, ParsedDocument, PolicyError, PolicyKind, PolicyResource, Proto,
    Section,
};
pub use resolve::{
    cidr_class, cidr_prefixes, resolve, Action, Endpoint, Entry, L7Rule, Peer, PolicyName, Resolved, Resolver, RuleRef,
};
pub use selector::{Selector, SelectorError};
pub use trace::{trace, trace_l7, HttpRequest, L7Reason, L7Trace, Reason, Trace, Verdict};
