//! Label selectors with Kubernetes semantics.
//!
//! A [`Selector`] is a validated `LabelSelector`: `matchLabels` and
//! `matchExpressions` are all ANDed, an empty selector matches everything.
//! Validation happens once, when a policy is parsed, so matching cannot fail.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why a `LabelSelector` is not valid. `path` is relative to the selector
/// (`matchExpressions[1].operator`); the policy parser prefixes it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("{path}: unknown operator {value:?}: use In, NotIn, Exists or DoesNotExist")]
    Operator { path: String, value: String },
    #[error("{path}: operator {operator} needs at least one value")]
    NoValues { path: String, operator: &'static str },
    #[error("{path}: operator {operator} takes no values: remove them")]
    UnexpectedValues { path: String, operator: &'static str },
    #[error("{path}: label key must not be empty")]
    EmptyKey { path: String },
}

impl SelectorError {
    /// The field path inside the selector.
    pub fn path(&self) -> &str {
        match self {
            SelectorError::Operator { path, .. }
            | SelectorError::NoValues { path, .. }
            | SelectorError::UnexpectedValues { path, .. }
            | SelectorError::EmptyKey { path } => path,
        }
    }

    /// The message without the path, for callers that report the path
    /// separately.
    pub fn reason(&self) -> String {
        let full = self.to_string();
        full.strip_prefix(&format!("{}: ", self.path()))
            .unwrap_or(&full)
            .to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Requirement {
    key: String,
    op: Op,
}

/// A validated label selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every label set (`{}`).
    pub fn everything() -> Self {
        Selector::default()
    }

    /// Validates a Kubernetes `LabelSelector`.
    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            if key.is_empty() {
                return Err(SelectorError::EmptyKey {
                    path: "matchLabels".into(),
                });
            }
            requirements.push(Requirement {
                key: key.clone(),
                op: Op::In(BTreeSet::from([value.clone()])),
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let path = |field: &str| format!("matchExpressions[{i}].{field}");
            if expr.key.is_empty() {
                return Err(SelectorError::EmptyKey { path: path("key") });
            }
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
            let op = match expr.operator.as_str() {
                "In" | "NotIn" => {
                    let operator = if expr.operator == "In" { "In" } else { "NotIn" };
                    if !has_values {
                        return Err(SelectorError::NoValues {
                            path: path("values"),
                            operator,
                        });
                    }
                    if operator == "In" {
                        Op::In(values)
                    } else {
                        Op::NotIn(values)
                    }
                }
                "Exists" | "DoesNotExist" => {
                    let operator = if expr.operator == "Exists" {
                        "Exists"
                    } else {
                        "DoesNotExist"
                    };
                    if has_values {
                        return Err(SelectorError::UnexpectedValues {
                            path: path("values"),
                            operator,
                        });
                    }
                    if operator == "Exists" {
                        Op::Exists
                    } else {
                        Op::DoesNotExist
                    }
                }
                other => {
                    return Err(SelectorError::Operator {
                        path: path("operator"),
                        value: other.to_string(),
                    })
                }
            };
            requirements.push(Requirement {
                key: expr.key.clone(),
                op,
            });
        }
        requirements.sort();
        requirements.dedup();
        Ok(Selector { requirements })
    }

    /// Whether `labels` satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.get(&r.key);
            match &r.op {
                Op::In(values) => value.is_some_and(|v| values.contains(v)),
                // Kubernetes: NotIn also matches when the key is absent.
                Op::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
                Op::Exists => value.is_some(),
                Op::DoesNotExist => value.is_none(),
            }
        })
    }

    /// True for `{}`, which matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether any requirement is about a key accepted by `f`.
    pub(crate) fn mentions_key(&self, f: impl Fn(&str) -> bool) -> bool {
        self.requirements.iter().any(|r| f(&r.key))
    }

    /// A copy that additionally requires `key=value`.
    pub(crate) fn and_equals(&self, key: &str, value: &str) -> Selector {
        let mut requirements = self.requirements.clone();
        requirements.push(Requirement {
            key: key.to_string(),
            op: Op::In(BTreeSet::from([value.to_string()])),
        });
        requirements.sort();
        requirements.dedup();
        Selector { requirements }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: Option<&[&str]>) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn sel(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::parse(&LabelSelector {
            match_labels: (!match_labels.is_empty()).then(|| labels(match_labels)),
            match_expressions: (!exprs.is_empty()).then_some(exprs),
        })
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything_including_no_labels() {
        let s = sel(&[], vec![]);
        assert!(s.is_empty());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("app", "web")])));
    }

    #[test]
    fn match_labels_are_anded() {
        let s = sel(&[("app", "web"), ("tier", "front")], vec![]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn operators_follow_kubernetes_semantics() {
        let in_ = sel(&[], vec![expr("env", "In", Some(&["prod", "stage"]))]);
        assert!(in_.matches(&labels(&[("env", "prod")])));
        assert!(!in_.matches(&labels(&[("env", "dev")])));
        assert!(!in_.matches(&labels(&[])));

        let not_in = sel(&[], vec![expr("env", "NotIn", Some(&["prod"]))]);
        assert!(not_in.matches(&labels(&[("env", "dev")])));
        assert!(not_in.matches(&labels(&[])), "NotIn matches an absent key");
        assert!(!not_in.matches(&labels(&[("env", "prod")])));

        let exists = sel(&[], vec![expr("env", "Exists", None)]);
        assert!(exists.matches(&labels(&[("env", "")])));
        assert!(!exists.matches(&labels(&[("other", "x")])));

        let absent = sel(&[], vec![expr("env", "DoesNotExist", Some(&[]))]);
        assert!(absent.matches(&labels(&[("other", "x")])));
        assert!(!absent.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let s = sel(&[("app", "web")], vec![expr("env", "NotIn", Some(&["prod"]))]);
        assert!(s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("env", "dev")])));
    }

    #[test]
    fn invalid_selectors_are_rejected_with_path() {
        let bad = |e| {
            Selector::parse(&LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![expr("ok", "Exists", None), e]),
            })
            .unwrap_err()
        };
        let e = bad(expr("env", "Equals", Some(&["x"])));
        assert_eq!(e.path(), "matchExpressions[1].operator");
        assert!(matches!(e, SelectorError::Operator { ref value, .. } if value == "Equals"));

        let e = bad(expr("env", "In", Some(&[])));
        assert_eq!(e.path(), "matchExpressions[1].values");
        assert!(matches!(e, SelectorError::NoValues { operator: "In", .. }));
        let e = bad(expr("env", "NotIn", None));
        assert!(matches!(e, SelectorError::NoValues { operator: "NotIn", .. }));

        let e = bad(expr("env", "Exists", Some(&["x"])));
        assert!(matches!(e, SelectorError::UnexpectedValues { operator: "Exists", .. }));

        let e = bad(expr("", "Exists", None));
        assert_eq!(e.path(), "matchExpressions[1].key");
    }
}
