//! JSON schemas of the rule types (feature `schema`), for the CRDs that
//! carry `toPorts[].rules` (sinew-crd). They check what a schema can check
//! (names, patterns, one matcher kind per header); [`crate::L7Rules::validate`]
//! stays the full validation, which the agent runs on every document.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};

use crate::rules::{HeaderMatch, StringMatch};

/// A header name or method token (RFC 9110 `tchar`).
pub(crate) const TOKEN_PATTERN: &str = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$";

impl JsonSchema for StringMatch {
    fn schema_name() -> Cow<'static, str> {
        "StringMatch".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // A string (exact match) or one of {exact|prefix|regex: string}. A
        // structural schema cannot say "string or object", so the node
        // keeps what it is given and the agent validates it.
        json_schema!({
            "description": "A string (exact match) or one of {exact: ...}, {prefix: ...}, {regex: ...} (a regex matches the whole value).",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

impl JsonSchema for HeaderMatch {
    fn schema_name() -> Cow<'static, str> {
        "HeaderMatch".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A header condition: the name alone (or present: true) requires the header, present: false forbids it, exact or regex matches one of its values.",
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": TOKEN_PATTERN},
                "present": {"type": "boolean"},
                "exact": {"type": "string", "maxLength": 4096},
                "regex": {"type": "string", "maxLength": 4096}
            },
            "x-kubernetes-validations": [{
                "rule": "(has(self.present) ? 1 : 0) + (has(self.exact) ? 1 : 0) + (has(self.regex) ? 1 : 0) <= 1",
                "message": "give at most one of present, exact or regex"
            }]
        })
    }
}
