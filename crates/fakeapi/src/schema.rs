//! Validation of custom resources against their CRD's structural schema,
//! as the API server does before it stores a write
//! (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation>):
//! `type`, `required`, `enum`, `pattern`, `minLength`/`maxLength`,
//! `minimum`/`maximum`, `minItems`/`maxItems`, `maxProperties`, through
//! `properties`, `items` and `additionalProperties`. A failure is a 422
//! `Invalid` whose message names the field, as the API server's does.
//!
//! Not implemented: CEL rules (`x-kubernetes-validations`), formats,
//! `anyOf`/`oneOf`, and pruning of unknown fields (they are kept).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// One served custom resource.
#[derive(Clone, Debug)]
pub struct Crd {
    pub kind: String,
    pub namespaced: bool,
    /// `spec.versions[].subresources.status`: writes to the object keep
    /// its status, writes to `/status` change only the status.
    pub status: bool,
    pub schema: Value,
}

/// Custom resources by (group, plural).
pub type Crds = BTreeMap<(String, String), Crd>;

/// The CRDs of a multi-document YAML stream (the storage version's schema).
pub fn parse(yaml: &str) -> anyhow::Result<Crds> {
    let mut out = Crds::new();
    for d in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(d)?;
        if v["kind"] != "CustomResourceDefinition" {
            continue;
        }
        let spec = &v["spec"];
        let group = spec["group"].as_str().unwrap_or_default().to_string();
        let plural = spec["names"]["plural"].as_str().unwrap_or_default().to_string();
        let versions = spec["versions"].as_array().cloned().unwrap_or_default();
        let Some(version) = versions.iter().find(|v| v["storage"] == true).or(versions.first()) else {
            anyhow::bail!("CRD {plural}.{group} has no version");
        };
        out.insert(
            (group, plural),
            Crd {
                kind: spec["names"]["kind"].as_str().unwrap_or_default().to_string(),
                namespaced: spec["scope"] == "Namespaced",
                status: !version["subresources"]["status"].is_null(),
                schema: version["schema"]["openAPIV3Schema"].clone(),
            },
        );
    }
    Ok(out)
}

/// The violations of `v` against `schema`, each as `path: reason`.
pub fn validate(schema: &Value, v: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    check(schema, v, "", &mut errs);
    errs
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn check(s: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    if v.is_null() && s["nullable"] == true {
        return;
    }
    let mut bad = |reason: String| errs.push(format!("{path}: Invalid value: {v}: {reason}"));
    let int_or_string = s["x-kubernetes-int-or-string"] == true;
    let ty = s["type"].as_str().unwrap_or("");
    let type_ok = int_or_string && (v.is_i64() || v.is_u64() || v.is_string())
        || match ty {
            "" => true,
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            // The API server holds integers as int64.
            "integer" => v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => true,
        };
    if !type_ok {
        bad(format!("{path} in body must be of type {ty}"));
        return;
    }
    if let Some(allowed) = s["enum"].as_array() {
        if !allowed.contains(v) {
            let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
            bad(format!("supported values: {}", list.join(", ")));
        }
    }
    if let Some(text) = v.as_str() {
        let len = text.chars().count() as u64;
        if let Some(max) = s["maxLength"].as_u64().filter(|m| len > *m) {
            bad(format!("{path} in body should be at most {max} chars long"));
        }
        if let Some(min) = s["minLength"].as_u64().filter(|m| len < *m) {
            bad(format!("{path} in body should be at least {min} chars long"));
        }
        if let Some(p) = s["pattern"].as_str() {
            match regex::Regex::new(p) {
                Ok(re) if !re.is_match(text) => bad(format!("{path} in body should match '{p}'")),
                Ok(_) => {}
                Err(e) => bad(format!("the schema's pattern does not compile: {e}")),
            }
        }
    }
    if let Some(n) = v.as_i64().map(i128::from) {
        // Exact for integers: a bound near 2^63 must not round them.
        if let Some(max) = s["maximum"].as_f64().filter(|m| n > m.floor() as i128) {
            bad(format!("{path} in body should be less than or equal to {max}"));
        }
        if let Some(min) = s["minimum"].as_f64().filter(|m| n < m.ceil() as i128) {
            bad(format!("{path} in body should be greater than or equal to {min}"));
        }
    } else if let Some(n) = v.as_f64() {
        if let Some(max) = s["maximum"].as_f64().filter(|m| n > *m) {
            bad(format!("{path} in body should be less than or equal to {max}"));
        }
        if let Some(min) = s["minimum"].as_f64().filter(|m| n < *m) {
            bad(format!("{path} in body should be greater than or equal to {min}"));
        }
    }
    if let Some(items) = v.as_array() {
        if let Some(max) = s["maxItems"].as_u64().filter(|m| items.len() as u64 > *m) {
            bad(format!("{path} in body should have at most {max} items"));
        }
        if let Some(min) = s["minItems"].as_u64().filter(|m| (items.len() as u64) < *m) {
            bad(format!("{path} in body should have at least {min} items"));
        }
        if s["items"].is_object() {
            for (i, item) in items.iter().enumerate() {
                check(&s["items"], item, &format!("{path}[{i}]"), errs);
            }
        }
    }
    if let Some(map) = v.as_object() {
        if let Some(max) = s["maxProperties"].as_u64().filter(|m| map.len() as u64 > *m) {
            errs.push(format!(
                "{path}: Too many: {}: must have at most {max} items",
                map.len()
            ));
        }
        for r in s["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errs.push(format!("{}: Required value", join(path, r)));
            }
        }
        for (k, item) in map {
            // metadata is the API server's own (ObjectMeta), not the schema's.
            if path.is_empty() && matches!(k.as_str(), "metadata" | "apiVersion" | "kind") {
                continue;
            }
            if let Some(sub) = s["properties"].get(k) {
                check(sub, item, &join(path, k), errs);
            } else if s["additionalProperties"].is_object() {
                check(&s["additionalProperties"], item, &join(path, k), errs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn violations_name_the_field() {
        let s = json!({"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object",
            "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                           "e": {"type": "string", "enum": ["A", "B"]},
                           "l": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 3}}}}}});
        assert_eq!(
            validate(&s, &json!({"spec": {"n": 5, "e": "A", "l": {"x": "abc"}}})),
            Vec::<String>::new()
        );
        assert_eq!(validate(&s, &json!({})), ["spec: Required value"]);
        let e = validate(&s, &json!({"spec": {"n": 10, "e": "C", "l": {"x": "abcd"}}}));
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("spec.e: Invalid value: \"C\""), "{e:?}");
        assert!(
            e[1].contains("spec.l.x in body should be at most 3 chars long"),
            "{e:?}"
        );
        assert!(
            e[2].contains("spec.n in body should be less than or equal to 9"),
            "{e:?}"
        );
        assert_eq!(validate(&s, &json!({"spec": "x"})).len(), 1, "wrong type");
    }

    #[test]
    fn integers_are_int64_and_compared_exactly() {
        let s = json!({"type": "integer", "minimum": 1, "maximum": 9.223372036854776e18});
        assert!(validate(&s, &json!(i64::MAX)).is_empty());
        assert_eq!(validate(&s, &json!(u64::MAX)).len(), 1, "beyond int64");
        assert_eq!(validate(&s, &json!(0)).len(), 1);
        let s = json!({"type": "integer", "minimum": 256, "maximum": 4294967295u32});
        assert!(validate(&s, &json!(4294967295u32)).is_empty());
        assert_eq!(validate(&s, &json!(4294967296u64)).len(), 1);
        assert_eq!(validate(&s, &json!(255)).len(), 1);
    }
}
