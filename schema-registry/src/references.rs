//! Schema references: named types a schema uses but another subject defines. Avro decoders need
//! one self-contained schema, so the referenced definitions are inlined at their first use, in
//! the order an Avro parser meets names (depth first, fields in order).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A reference as the registry API carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Reference {
    /// The referenced type's name as the schema uses it (e.g. `com.acme.Address`).
    pub name: String,
    /// The subject the referenced schema is registered under.
    pub subject: String,
    /// Its version in that subject (`-1`: the latest).
    pub version: i64,
}

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// Replaces the first use of each referenced name in `schema` by its definition.
pub fn inline(schema: &Value, definitions: &HashMap<String, Value>) -> Value {
    let mut defined = HashSet::new();
    let mut out = schema.clone();
    walk(&mut out, None, definitions, &mut defined);
    out
}

fn full_name(name: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

fn walk(
    v: &mut Value,
    ns: Option<&str>,
    defs: &HashMap<String, Value>,
    defined: &mut HashSet<String>,
) {
    match v {
        Value::String(name) if !PRIMITIVES.contains(&name.as_str()) => {
            let full = full_name(name, ns);
            if defined.contains(&full) || defined.contains(name.as_str()) {
                return;
            }
            let def = defs.get(&full).or_else(|| defs.get(name.as_str()));
            if let Some(def) = def {
                let mut def = def.clone();
                // The definition may itself use names: resolve them in its own namespace.
                walk(&mut def, None, defs, defined);
                defined.insert(full);
                *v = def;
            }
        }
        Value::Array(branches) => {
            for b in branches {
                walk(b, ns, defs, defined);
            }
        }
        Value::Object(o) => {
            let t = o
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let mut inner_ns = ns.map(str::to_string);
            if matches!(t.as_str(), "record" | "enum" | "fixed" | "error") {
                if let Some(name) = o.get("name").and_then(Value::as_str) {
                    let this_ns = o.get("namespace").and_then(Value::as_str).or(ns);
                    let full = full_name(name, this_ns);
                    inner_ns = full.rsplit_once('.').map(|(n, _)| n.to_string());
                    defined.insert(full);
                }
            }
            if let Some(Value::Array(fields)) = o.get_mut("fields") {
                for f in fields {
                    if let Some(ft) = f.get_mut("type") {
                        walk(ft, inner_ns.as_deref(), defs, defined);
                    }
                }
            }
            for k in ["items", "values"] {
                if let Some(x) = o.get_mut(k) {
                    walk(x, inner_ns.as_deref(), defs, defined);
                }
            }
            if let Some(x) = o.get_mut("type").filter(|x| !x.is_string()) {
                walk(x, inner_ns.as_deref(), defs, defined);
            } else if let Some(x) = o.get_mut("type") {
                if !matches!(
                    t.as_str(),
                    "record" | "enum" | "fixed" | "error" | "array" | "map"
                ) {
                    walk(x, inner_ns.as_deref(), defs, defined);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inlines_at_first_use_only() {
        let address = json!({"type": "record", "name": "Address", "namespace": "com.acme", "fields": [
            {"name": "city", "type": "string"}]});
        let order = json!({"type": "record", "name": "Order", "namespace": "com.acme", "fields": [
            {"name": "ship", "type": "com.acme.Address"},
            {"name": "bill", "type": ["null", "Address"]}]});
        let defs = HashMap::from([("com.acme.Address".to_string(), address.clone())]);
        let out = inline(&order, &defs);
        assert_eq!(out["fields"][0]["type"], address);
        assert_eq!(out["fields"][1]["type"], json!(["null", "Address"]));
    }
}
