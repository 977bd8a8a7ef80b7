//! Avro schema resolution, as the registry's compatibility checks need it: can data written with
//! one schema be read with another (Avro specification, "Schema Resolution")?
//!
//! Checked: primitive promotions (int → long, float, double; long → float, double; float →
//! double; string ↔ bytes), records matched by field name or reader alias (a reader field absent
//! from the writer needs a default), enums (writer symbols must exist in the reader unless it has
//! a default), fixed (same size), arrays and maps (items / values), unions (every writer branch
//! must be readable by some reader branch; a non-union writer by some reader branch), and named
//! references to types defined earlier in the schema. Logical types follow their underlying type.
//! Records, enums and fixed types also match by name, as Avro's `SchemaCompatibility` (and so
//! Confluent's registry) does: the writer's full name is the reader's, or one of the reader's
//! aliases (names and aliases qualified by their enclosing namespace).

use std::collections::HashMap;

use serde_json::Value;

/// Compatibility levels of the Confluent registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// No check.
    None,
    /// A new schema reads data of the last one.
    Backward,
    /// A new schema reads data of every earlier one.
    BackwardTransitive,
    /// The last schema reads data of a new one.
    Forward,
    /// Every earlier schema reads data of a new one.
    ForwardTransitive,
    /// Backward and forward with the last schema.
    Full,
    /// Backward and forward with every earlier schema.
    FullTransitive,
}

impl Level {
    /// Parses a Confluent compatibility level (`BACKWARD`, `FULL_TRANSITIVE`, ...), any case.
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_uppercase().as_str() {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD" => Level::Forward,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL" => Level::Full,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            _ => return None,
        })
    }

    /// Checks `new` against the existing versions (oldest first). Returns the problems found.
    pub fn check(self, new: &Value, existing: &[Value]) -> Vec<String> {
        self.check_with(new, existing, can_read)
    }

    /// [`Level::check`] for any schema language: `can_read(reader, writer)` says whether data
    /// written with `writer` reads with `reader`.
    pub fn check_with<T>(
        self,
        new: &T,
        existing: &[T],
        can_read: impl Fn(&T, &T) -> Result<(), String>,
    ) -> Vec<String> {
        let against: &[T] = match self {
            Level::None => return Vec::new(),
            Level::Backward | Level::Forward | Level::Full => {
                existing.last().map(std::slice::from_ref).unwrap_or(&[])
            }
            _ => existing,
        };
        let (backward, forward) = match self {
            Level::Backward | Level::BackwardTransitive => (true, false),
            Level::Forward | Level::ForwardTransitive => (false, true),
            Level::Full | Level::FullTransitive => (true, true),
            Level::None => (false, false),
        };
        let mut problems = Vec::new();
        for old in against {
            if backward {
                if let Err(e) = can_read(new, old) {
                    problems.push(format!(
                        "the new schema cannot read data written with an existing version: {e}"
                    ));
                }
            }
            if forward {
                if let Err(e) = can_read(old, new) {
                    problems.push(format!(
                        "an existing version cannot read data written with the new schema: {e}"
                    ));
                }
            }
        }
        problems
    }
}

/// Whether data written with `writer` can be read with `reader`.
pub fn can_read(reader: &Value, writer: &Value) -> Result<(), String> {
    let mut rn = HashMap::new();
    let mut wn = HashMap::new();
    collect_named(reader, None, &mut rn);
    collect_named(writer, None, &mut wn);
    Resolver {
        rn: &rn,
        wn: &wn,
        depth: 0,
        rns: None,
        wns: None,
    }
    .check(reader, writer, "")
}

fn full_name(v: &serde_json::Map<String, Value>, ns: Option<&str>) -> Option<String> {
    let name = v.get("name")?.as_str()?;
    if name.contains('.') {
        return Some(name.to_string());
    }
    let ns = v.get("namespace").and_then(Value::as_str).or(ns);
    Some(match ns {
        Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    })
}

fn collect_named(v: &Value, ns: Option<&str>, out: &mut HashMap<String, Value>) {
    match v {
        Value::Array(branches) => branches.iter().for_each(|b| collect_named(b, ns, out)),
        Value::Object(o) => {
            let t = o.get("type").and_then(Value::as_str).unwrap_or_default();
            let mut inner_ns = ns.map(str::to_string);
            if matches!(t, "record" | "enum" | "fixed" | "error") {
                if let Some(full) = full_name(o, ns) {
                    inner_ns = full.rsplit_once('.').map(|(n, _)| n.to_string());
                    out.insert(full.clone(), v.clone());
                    // Short names resolve too (same-namespace references).
                    if let Some(short) = o.get("name").and_then(Value::as_str) {
                        out.entry(short.to_string()).or_insert_with(|| v.clone());
                    }
                }
            }
            if let Some(fields) = o.get("fields").and_then(Value::as_array) {
                for f in fields {
                    if let Some(ft) = f.get("type") {
                        collect_named(ft, inner_ns.as_deref(), out);
                    }
                }
            }
            for k in ["items", "values"] {
                if let Some(x) = o.get(k) {
                    collect_named(x, inner_ns.as_deref(), out);
                }
            }
            if let Some(x) = o.get("type").filter(|x| !x.is_string()) {
                collect_named(x, inner_ns.as_deref(), out);
            }
        }
        _ => {}
    }
}

struct Resolver<'a> {
    rn: &'a HashMap<String, Value>,
    wn: &'a HashMap<String, Value>,
    depth: usize,
    /// The enclosing namespaces of the reader's and the writer's types being compared.
    rns: Option<String>,
    wns: Option<String>,
}

/// `name` qualified by `ns` unless it is already a full name.
fn qualify(name: &str, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !name.contains('.') && !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_string(),
    }
}

/// The full name of the named type `v` (a reference, or a definition) and its definition `def`,
/// in namespace `ns`; with its aliases, qualified the same way.
fn names_of(v: &Value, def: &Value, ns: Option<&str>) -> (String, Vec<String>) {
    let full = match v {
        Value::String(s) => qualify(s, ns),
        _ => def
            .as_object()
            .and_then(|o| full_name(o, ns))
            .unwrap_or_default(),
    };
    let own_ns = full.rsplit_once('.').map(|(n, _)| n.to_string());
    let aliases = def
        .get("aliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|a| qualify(a, own_ns.as_deref()))
        .collect();
    (full, aliases)
}

const PRIMITIVES: &[&str] = &[
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

impl Resolver<'_> {
    /// Resolves names to definitions; returns the (type name, definition object).
    fn kind<'v>(
        &self,
        v: &'v Value,
        names: &'v HashMap<String, Value>,
    ) -> Result<(String, &'v Value), String> {
        match v {
            Value::String(s) if PRIMITIVES.contains(&s.as_str()) => Ok((s.clone(), v)),
            Value::String(s) => names
                .get(s)
                .or_else(|| names.get(s.rsplit('.').next().unwrap_or(s)))
                .map(|d| (d["type"].as_str().unwrap_or_default().to_string(), d))
                .ok_or_else(|| format!("unknown type `{s}`")),
            Value::Array(_) => Ok(("union".into(), v)),
            Value::Object(o) => match o.get("type") {
                Some(Value::String(t)) => Ok((t.clone(), v)),
                Some(inner) => self.kind(inner, names),
                None => Err("a schema object without `type`".into()),
            },
            _ => Err(format!("not a schema: {v}")),
        }
    }

    fn check(&mut self, reader: &Value, writer: &Value, path: &str) -> Result<(), String> {
        self.depth += 1;
        if self.depth > 64 {
            // Recursive types: assume compatible below this depth.
            self.depth -= 1;
            return Ok(());
        }
        let r = self.check_inner(reader, writer, path);
        self.depth -= 1;
        r
    }

    fn check_inner(&mut self, reader: &Value, writer: &Value, path: &str) -> Result<(), String> {
        let (rk, rd) = self.kind(reader, self.rn)?;
        let (wk, wd) = self.kind(writer, self.wn)?;
        let at = if path.is_empty() {
            "the top level".to_string()
        } else {
            format!("field `{path}`")
        };
        if wk == "union" {
            for b in wd.as_array().expect("union") {
                self.check(reader, b, path)?;
            }
            return Ok(());
        }
        if rk == "union" {
            let ok = rd
                .as_array()
                .expect("union")
                .iter()
                .any(|b| self.check(b, writer, path).is_ok());
            return if ok {
                Ok(())
            } else {
                Err(format!(
                    "at {at}: no branch of the reader's union reads the writer's {wk}"
                ))
            };
        }
        let promotable = match (wk.as_str(), rk.as_str()) {
            (w, r) if w == r => true,
            ("int", "long" | "float" | "double") => true,
            ("long", "float" | "double") => true,
            ("float", "double") => true,
            ("string", "bytes") | ("bytes", "string") => true,
            _ => false,
        };
        if !promotable {
            return Err(format!("at {at}: the writer's {wk} cannot be read as {rk}"));
        }
        let mut inner_ns = (self.rns.clone(), self.wns.clone());
        if matches!(rk.as_str(), "record" | "error" | "enum" | "fixed") {
            let (rname, raliases) = names_of(reader, rd, self.rns.as_deref());
            let (wname, _) = names_of(writer, wd, self.wns.as_deref());
            if rname != wname && !raliases.contains(&wname) {
                return Err(format!(
                    "at {at}: the writer's {wk} `{wname}` is not the reader's `{rname}` (nor one \
                     of its aliases)"
                ));
            }
            let ns = |full: &str| full.rsplit_once('.').map(|(n, _)| n.to_string());
            inner_ns = (ns(&rname), ns(&wname));
        }
        match rk.as_str() {
            "record" | "error" => {
                let rf = rd["fields"].as_array().cloned().unwrap_or_default();
                let wf = wd["fields"].as_array().cloned().unwrap_or_default();
                for f in &rf {
                    let name = f["name"].as_str().unwrap_or_default();
                    let aliases: Vec<&str> = f
                        .get("aliases")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let sub = if path.is_empty() {
                        name.to_string()
                    } else {
                        format!("{path}.{name}")
                    };
                    match wf.iter().find(|w| {
                        let wn = w["name"].as_str().unwrap_or_default();
                        wn == name || aliases.contains(&wn)
                    }) {
                        Some(w) => {
                            // Field types are named in the record's namespace.
                            let outer = (self.rns.clone(), self.wns.clone());
                            (self.rns, self.wns) = inner_ns.clone();
                            let r = self.check(&f["type"], &w["type"], &sub);
                            (self.rns, self.wns) = outer;
                            r?
                        }
                        None if f.get("default").is_some() => {}
                        None => {
                            return Err(format!(
                                "field `{sub}` is new and has no default, so data written without it cannot be read"
                            ))
                        }
                    }
                }
                Ok(())
            }
            "enum" => {
                if rd.get("default").is_some() {
                    return Ok(());
                }
                let rs: Vec<&Value> = rd["symbols"]
                    .as_array()
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                for s in wd["symbols"].as_array().into_iter().flatten() {
                    if !rs.contains(&s) {
                        return Err(format!("at {at}: enum symbol {s} is missing from the reader and it has no default"));
                    }
                }
                Ok(())
            }
            "fixed" => {
                if rd["size"] != wd["size"] {
                    return Err(format!(
                        "at {at}: fixed size {} cannot be read as {}",
                        wd["size"], rd["size"]
                    ));
                }
                Ok(())
            }
            "array" => self.check(&rd["items"], &wd["items"], &format!("{path}[]")),
            "map" => self.check(&rd["values"], &wd["values"], &format!("{path}{{}}")),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(fields: Value) -> Value {
        json!({"type": "record", "name": "R", "fields": fields})
    }

    #[test]
    fn resolution_rules() {
        let v1 = rec(json!([{"name": "a", "type": "int"}]));
        let v2 = rec(
            json!([{"name": "a", "type": "long"}, {"name": "b", "type": ["null", "string"], "default": null}]),
        );
        let v3 = rec(json!([{"name": "a", "type": "int"}, {"name": "c", "type": "string"}]));
        assert!(can_read(&v2, &v1).is_ok(), "promotion and defaulted field");
        assert!(can_read(&v1, &v2)
            .unwrap_err()
            .contains("long cannot be read as int"));
        let e = can_read(&v3, &v1).unwrap_err();
        assert!(e.contains("field `c` is new and has no default"), "{e}");
        assert!(can_read(&v1, &v3).is_ok(), "a removed field is skipped");
    }

    #[test]
    fn levels() {
        let v1 = rec(json!([{"name": "a", "type": "int"}]));
        let v2 = rec(
            json!([{"name": "a", "type": "int"}, {"name": "b", "type": "string", "default": ""}]),
        );
        let v3 = rec(json!([{"name": "b", "type": "string"}]));
        assert!(Level::Backward
            .check(&v2, std::slice::from_ref(&v1))
            .is_empty());
        assert!(Level::Full.check(&v2, std::slice::from_ref(&v1)).is_empty());
        // v3 reads v2 (b exists) but not v1 (b missing, no default): only transitive sees it.
        assert!(Level::Backward
            .check(&v3, &[v1.clone(), v2.clone()])
            .is_empty());
        assert_eq!(
            Level::BackwardTransitive
                .check(&v3, &[v1.clone(), v2.clone()])
                .len(),
            1
        );
        assert!(!Level::Forward
            .check(&v3, std::slice::from_ref(&v2))
            .is_empty());
        assert!(Level::None.check(&v3, &[v1]).is_empty());
    }

    #[test]
    fn enums_unions_named_references() {
        let e1 = json!({"type": "enum", "name": "S", "symbols": ["A", "B"]});
        let e2 = json!({"type": "enum", "name": "S", "symbols": ["A"]});
        assert!(can_read(&e1, &e2).is_ok());
        assert!(can_read(&e2, &e1).is_err());
        let nested = rec(json!([
            {"name": "x", "type": {"type": "record", "name": "P", "fields": [{"name": "q", "type": "int"}]}},
            {"name": "y", "type": ["null", "P"]}
        ]));
        assert!(can_read(&nested, &nested).is_ok());
        assert!(can_read(&json!(["null", "long"]), &json!("int")).is_ok());
        assert!(can_read(&json!("long"), &json!(["null", "long"])).is_err());
    }

    #[test]
    fn named_types_match_by_full_name_or_reader_alias() {
        let f = |name: &str, ns: Option<&str>, aliases: &[&str]| {
            let mut v = json!({"type": "record", "name": name, "aliases": aliases,
                "fields": [{"name": "a", "type": "int"}]});
            if let Some(ns) = ns {
                v["namespace"] = json!(ns);
            }
            v
        };
        let e = can_read(&f("Order", None, &[]), &f("Sale", None, &[])).unwrap_err();
        assert!(e.contains("`Sale` is not the reader's `Order`"), "{e}");
        assert!(can_read(&f("Order", None, &["Sale"]), &f("Sale", None, &[])).is_ok());
        // Namespaces are part of the name; an alias is qualified by the reader's namespace.
        assert!(can_read(&f("Order", Some("a"), &[]), &f("Order", Some("b"), &[])).is_err());
        assert!(can_read(
            &f("Order", Some("a"), &["b.Order"]),
            &f("Order", Some("b"), &[])
        )
        .is_ok());
        assert!(can_read(&f("Order", Some("a"), &[]), &f("a.Order", None, &[])).is_ok());
        // A nested type inherits its record's namespace, however each side writes it.
        let outer = |inner: Value| {
            json!({"type": "record", "name": "O", "namespace": "shop",
                "fields": [{"name": "x", "type": inner}]})
        };
        let implicit = outer(json!({"type": "enum", "name": "S", "symbols": ["A"]}));
        let explicit =
            outer(json!({"type": "enum", "name": "S", "namespace": "shop", "symbols": ["A"]}));
        let other =
            outer(json!({"type": "enum", "name": "S", "namespace": "crm", "symbols": ["A"]}));
        assert!(can_read(&implicit, &explicit).is_ok());
        assert!(can_read(&explicit, &implicit).is_ok());
        assert!(can_read(&implicit, &other).unwrap_err().contains("`crm.S`"));
        // Fixed types too.
        let fixed = |n: &str| json!({"type": "fixed", "name": n, "size": 4});
        assert!(can_read(&fixed("A"), &fixed("B")).is_err());
    }
}

/// The resolution rules against apache-avro's `SchemaCompatibility` on schema pairs both
/// implement (apache-avro's alias support is partial, so aliases are left to the unit tests).
#[cfg(test)]
mod differential {
    use super::can_read;
    use apache_avro::schema_compatibility::SchemaCompatibility;
    use apache_avro::Schema;
    use serde_json::{json, Value};

    fn rec(name: &str, fields: Value) -> Value {
        json!({"type": "record", "name": name, "namespace": "shop", "fields": fields})
    }

    #[test]
    fn agrees_with_apache_avro() {
        let f = |n: &str, t: Value| json!({"name": n, "type": t});
        let with_default =
            |n: &str, t: Value, d: Value| json!({"name": n, "type": t, "default": d});
        let types = [
            json!("int"),
            json!("long"),
            json!("float"),
            json!("double"),
            json!("string"),
            json!("boolean"),
            json!(["null", "int"]),
            json!(["null", "long"]),
            json!(["null", "string"]),
            json!({"type": "array", "items": "int"}),
            json!({"type": "array", "items": "long"}),
            json!({"type": "map", "values": "float"}),
            json!({"type": "map", "values": "double"}),
            json!({"type": "enum", "name": "S", "symbols": ["A", "B"]}),
            json!({"type": "enum", "name": "S", "symbols": ["A"]}),
            json!({"type": "enum", "name": "T", "symbols": ["A", "B"]}),
            json!({"type": "fixed", "name": "H", "size": 4}),
            json!({"type": "fixed", "name": "H", "size": 8}),
            rec("P", json!([f("q", json!("int"))])),
            rec("P", json!([f("q", json!("long"))])),
            rec("Q", json!([f("q", json!("int"))])),
        ];
        let mut schemas: Vec<Value> = types
            .iter()
            .map(|t| rec("R", json!([f("a", t.clone())])))
            .collect();
        schemas.push(rec(
            "R",
            json!([f("a", json!("int")), f("b", json!("string"))]),
        ));
        schemas.push(rec(
            "R",
            json!([
                f("a", json!("int")),
                with_default("b", json!("string"), json!("x"))
            ]),
        ));
        schemas.push(rec("R", json!([f("b", json!("string"))])));
        schemas.push(rec("R2", json!([f("a", json!("int"))])));
        schemas.extend(types.iter().cloned());
        let (mut pairs, mut compatible) = (0, 0);
        for w in &schemas {
            for r in &schemas {
                let (Ok(ws), Ok(rs)) = (Schema::parse(w), Schema::parse(r)) else {
                    panic!("the corpus is valid Avro: {w} / {r}");
                };
                let theirs = SchemaCompatibility::can_read(&ws, &rs).is_ok();
                let ours = can_read(r, w);
                assert_eq!(
                    ours.is_ok(),
                    theirs,
                    "writer {w}\nreader {r}\nours: {ours:?}, apache-avro: {theirs}"
                );
                pairs += 1;
                compatible += usize::from(theirs);
            }
        }
        assert!(
            pairs > 600 && compatible > 40 && compatible < pairs - 100,
            "{compatible}/{pairs}"
        );
    }
}
