//! Protobuf schemas as the registry carries them, compiled into descriptors.
//!
//! A registered Protobuf schema is either `.proto` text (what the Java serializers register and
//! Confluent's server serves) or a base64-encoded `FileDescriptorProto` (what confluent-kafka's
//! Python serializer registers). Its imports are schema references: other subjects' schemas,
//! named by import path. [`compile`] turns the main schema and its referenced files into a
//! descriptor pool with `protox` (pure Rust, no `protoc`); `google/protobuf/*.proto` resolve
//! built in when no reference supplies them. [`message_at`] follows a record's message-index path
//! to its message type, and [`differences`] applies Confluent's Protobuf compatibility rules for
//! the common cases (what a reader of one version cannot read of the other).
//!
//! Invariant: every function here is pure; an invalid schema is an `Err` naming the file and
//! the reason, never a panic.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use prost::Message as _;
use prost_reflect::{
    Cardinality, DescriptorPool, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor,
};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

/// The name the main schema compiles under when it is text (it names no file itself).
pub const MAIN_FILE: &str = "lakesink_registered_schema.proto";

/// A compiled schema: its pool and the main file.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Every file the schema needs.
    pub pool: DescriptorPool,
    /// The registered schema itself.
    pub file: FileDescriptor,
}

/// The base64 `FileDescriptorProto` form, if `schema` is in it.
fn descriptor_form(schema: &str) -> Option<prost_types::FileDescriptorProto> {
    let s = schema.trim();
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == ';' || c == '{') {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    prost_types::FileDescriptorProto::decode(bytes.as_slice()).ok()
}

/// Files by import name, as text or descriptor.
struct Files(HashMap<String, String>);

impl FileResolver for Files {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        let Some(schema) = self.0.get(name) else {
            return Err(protox::Error::file_not_found(name));
        };
        match descriptor_form(schema) {
            Some(mut d) => {
                d.name = Some(name.to_string());
                Ok(File::from_file_descriptor_proto(d))
            }
            None => File::from_source(name, schema),
        }
    }
}

/// Compiles `schema` with the referenced files `references` (import name, schema), which may
/// themselves be text or descriptors.
pub fn compile(schema: &str, references: &[(String, String)]) -> Result<Compiled, String> {
    let main_name = descriptor_form(schema)
        .and_then(|d| d.name)
        .filter(|n| !n.is_empty() && !references.iter().any(|(r, _)| r == n))
        .unwrap_or_else(|| MAIN_FILE.to_string());
    let mut files: HashMap<String, String> = references.iter().cloned().collect();
    files.insert(main_name.clone(), schema.to_string());
    let mut chain = ChainFileResolver::new();
    chain.add(Files(files));
    chain.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(chain);
    compiler.include_imports(true);
    compiler
        .open_file(&main_name)
        .map_err(|e| format!("invalid Protobuf schema: {e}"))?;
    let pool = compiler.descriptor_pool();
    let file = pool.get_file_by_name(&main_name).ok_or_else(|| {
        "invalid Protobuf schema: the compiled set lost its main file".to_string()
    })?;
    Ok(Compiled { pool, file })
}

/// The message type a record's message-index path names: the first index picks a top-level
/// message of the file, each further index a message nested in the previous one.
pub fn message_at(file: &FileDescriptor, path: &[i32]) -> Result<MessageDescriptor, String> {
    let bad = || {
        format!(
            "message-index path {path:?} names no message in schema file `{}`",
            file.name()
        )
    };
    let (first, rest) = path.split_first().ok_or_else(bad)?;
    let mut msg = usize::try_from(*first)
        .ok()
        .and_then(|i| file.messages().nth(i))
        .ok_or_else(bad)?;
    for i in rest {
        msg = usize::try_from(*i)
            .ok()
            .and_then(|i| msg.child_messages().filter(|m| !m.is_map_entry()).nth(i))
            .ok_or_else(bad)?;
    }
    Ok(msg)
}

/// The message-index path of `msg` in its file (the inverse of [`message_at`]).
pub fn path_of(msg: &MessageDescriptor) -> Vec<i32> {
    let mut path = Vec::new();
    let mut cur = msg.clone();
    loop {
        match cur.parent_message() {
            Some(parent) => {
                let i = parent
                    .child_messages()
                    .filter(|m| !m.is_map_entry())
                    .position(|m| m == cur)
                    .unwrap_or(0);
                path.push(i as i32);
                cur = parent;
            }
            None => {
                let i = cur
                    .parent_file()
                    .messages()
                    .position(|m| m == cur)
                    .unwrap_or(0);
                path.push(i as i32);
                break;
            }
        }
    }
    path.reverse();
    path
}

/// Scalar kinds that share a wire encoding and so read each other (Confluent's rules follow
/// protobuf's: int32/uint32/int64/uint64/bool, sint32/sint64, fixed32/sfixed32,
/// fixed64/sfixed64, string/bytes).
fn wire_group(kind: &Kind) -> Option<u8> {
    Some(match kind {
        Kind::Int32 | Kind::Uint32 | Kind::Int64 | Kind::Uint64 | Kind::Bool => 0,
        Kind::Sint32 | Kind::Sint64 => 1,
        Kind::Fixed32 | Kind::Sfixed32 => 2,
        Kind::Fixed64 | Kind::Sfixed64 => 3,
        Kind::String | Kind::Bytes => 4,
        Kind::Float => 5,
        Kind::Double => 6,
        Kind::Enum(_) => 0,
        Kind::Message(_) => return None,
    })
}

fn kind_name(f: &FieldDescriptor) -> String {
    match f.kind() {
        Kind::Message(m) => m.full_name().to_string(),
        Kind::Enum(e) => e.full_name().to_string(),
        k => format!("{k:?}").to_ascii_lowercase(),
    }
}

/// What makes data of one version unreadable with the other, in Confluent's terms
/// (`PACKAGE_CHANGED`, `MESSAGE_REMOVED`, `FIELD_KIND_CHANGED`, `FIELD_SCALAR_KIND_CHANGED`,
/// `FIELD_NAMED_TYPE_CHANGED`, `FIELD_LABEL_CHANGED`, `FIELD_MOVED_TO_EXISTING_ONEOF`,
/// `REQUIRED_FIELD_ADDED`/`REMOVED`, `SYNTAX_VERSION_CHANGED`). Adding and removing optional
/// fields, messages and enum values is compatible, as in protobuf itself. Empty: compatible.
pub fn differences(new: &FileDescriptor, old: &FileDescriptor) -> Vec<String> {
    let mut out = Vec::new();
    if new.package_name() != old.package_name() {
        out.push(format!(
            "PACKAGE_CHANGED: `{}` became `{}`",
            old.package_name(),
            new.package_name()
        ));
        return out;
    }
    if new.syntax() != old.syntax() {
        out.push("SYNTAX_VERSION_CHANGED".to_string());
    }
    let new_msgs: BTreeMap<String, MessageDescriptor> = all_messages(new);
    for (name, o) in all_messages(old) {
        let Some(n) = new_msgs.get(&name) else {
            out.push(format!("MESSAGE_REMOVED: `{name}`"));
            continue;
        };
        for of in o.fields() {
            let at = format!("`{name}` field {} (`{}`)", of.number(), of.name());
            let Some(nf) = n.get_field(of.number()) else {
                if of.cardinality() == Cardinality::Required {
                    out.push(format!("REQUIRED_FIELD_REMOVED: {at}"));
                }
                continue;
            };
            let (ok, nk) = (of.kind(), nf.kind());
            match (wire_group(&ok), wire_group(&nk)) {
                (None, None) if kind_name(&of) != kind_name(&nf) => out.push(format!(
                    "FIELD_NAMED_TYPE_CHANGED: {at} was `{}`, is `{}`",
                    kind_name(&of),
                    kind_name(&nf)
                )),
                (Some(a), Some(b)) if a != b => out.push(format!(
                    "FIELD_SCALAR_KIND_CHANGED: {at} was {}, is {}",
                    kind_name(&of),
                    kind_name(&nf)
                )),
                (None, Some(_)) | (Some(_), None) => out.push(format!(
                    "FIELD_KIND_CHANGED: {at} was {}, is {}",
                    kind_name(&of),
                    kind_name(&nf)
                )),
                _ => {}
            }
            if of.is_list() != nf.is_list() || of.is_map() != nf.is_map() {
                out.push(format!("FIELD_LABEL_CHANGED: {at}"));
            }
            let real = |f: &FieldDescriptor| f.containing_oneof().filter(|o| !o.is_synthetic());
            if real(&of).is_none() {
                if let Some(oneof) = real(&nf) {
                    let existed = o.oneofs().any(|x| x.name() == oneof.name());
                    if existed {
                        out.push(format!(
                            "FIELD_MOVED_TO_EXISTING_ONEOF: {at} into `{}`",
                            oneof.name()
                        ));
                    }
                }
            }
        }
        for nf in n.fields() {
            if nf.cardinality() == Cardinality::Required && o.get_field(nf.number()).is_none() {
                out.push(format!(
                    "REQUIRED_FIELD_ADDED: `{name}` field {} (`{}`)",
                    nf.number(),
                    nf.name()
                ));
            }
        }
    }
    out
}

/// Whether data written as message `writer` reads as message `reader`: every field number both
/// declare has a compatible wire encoding and the same label (singular, repeated, map), in
/// nested messages too. Fields only one side declares are fine (protobuf skips or defaults them).
pub fn readable(reader: &MessageDescriptor, writer: &MessageDescriptor) -> Result<(), String> {
    fn walk(
        r: &MessageDescriptor,
        w: &MessageDescriptor,
        seen: &mut Vec<(String, String)>,
    ) -> Result<(), String> {
        let pair = (r.full_name().to_string(), w.full_name().to_string());
        if seen.contains(&pair) {
            return Ok(());
        }
        seen.push(pair);
        for wf in w.fields() {
            let Some(rf) = r.get_field(wf.number()) else {
                continue;
            };
            let at = || {
                format!(
                    "`{}` field {} (`{}`)",
                    w.full_name(),
                    wf.number(),
                    wf.name()
                )
            };
            if wf.is_list() != rf.is_list() || wf.is_map() != rf.is_map() {
                return Err(format!(
                    "{}: repeated in one version, not in the other",
                    at()
                ));
            }
            match (wf.kind(), rf.kind()) {
                (Kind::Message(wm), Kind::Message(rm)) => walk(&rm, &wm, seen)?,
                (wk, rk) if wire_group(&wk) != wire_group(&rk) || wire_group(&wk).is_none() => {
                    return Err(format!(
                        "{}: written as {}, read as {}",
                        at(),
                        kind_name(&wf),
                        kind_name(&rf)
                    ))
                }
                _ => {}
            }
        }
        Ok(())
    }
    walk(reader, writer, &mut Vec::new())
}

fn all_messages(file: &FileDescriptor) -> BTreeMap<String, MessageDescriptor> {
    fn walk(m: MessageDescriptor, out: &mut BTreeMap<String, MessageDescriptor>) {
        for c in m.child_messages().filter(|c| !c.is_map_entry()) {
            walk(c, out);
        }
        out.insert(m.full_name().to_string(), m);
    }
    let mut out = BTreeMap::new();
    for m in file.messages() {
        walk(m, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = r#"
        syntax = "proto3";
        package shop;
        import "google/protobuf/timestamp.proto";
        import "shop/address.proto";
        message Order {
          int64 id = 1;
          string customer = 2;
          Address ship_to = 3;
          google.protobuf.Timestamp placed = 4;
          message Line { string sku = 1; int32 qty = 2; }
          repeated Line lines = 5;
        }
        message Refund { int64 order_id = 1; }
    "#;
    const ADDRESS: &str =
        r#"syntax = "proto3"; package shop; message Address { string city = 1; }"#;

    fn refs() -> Vec<(String, String)> {
        vec![("shop/address.proto".into(), ADDRESS.into())]
    }

    #[test]
    fn text_with_references_compiles_and_paths_name_messages() {
        let c = compile(ORDERS, &refs()).unwrap();
        assert_eq!(message_at(&c.file, &[0]).unwrap().full_name(), "shop.Order");
        assert_eq!(
            message_at(&c.file, &[1]).unwrap().full_name(),
            "shop.Refund"
        );
        let line = message_at(&c.file, &[0, 0]).unwrap();
        assert_eq!(line.full_name(), "shop.Order.Line");
        assert_eq!(path_of(&line), vec![0, 0]);
        assert!(message_at(&c.file, &[2]).unwrap_err().contains("[2]"));
        let e = compile(ORDERS, &[]).unwrap_err();
        assert!(e.contains("shop/address.proto"), "{e}");
        assert!(compile("message {", &[]).is_err());
    }

    #[test]
    fn the_descriptor_form_compiles_like_the_text() {
        let c = compile(ORDERS, &refs()).unwrap();
        let b64 = |f: &FileDescriptor| {
            base64::engine::general_purpose::STANDARD
                .encode(f.file_descriptor_proto().encode_to_vec())
        };
        let addr = c.pool.get_file_by_name("shop/address.proto").unwrap();
        let again = compile(
            &b64(&c.file),
            &[("shop/address.proto".to_string(), b64(&addr))],
        )
        .unwrap();
        let m = message_at(&again.file, &[0]).unwrap();
        assert_eq!(m.full_name(), "shop.Order");
        assert_eq!(m.fields().count(), 5);
    }

    #[test]
    fn compatibility_follows_confluents_common_rules() {
        let v = |body: &str| {
            compile(&format!("syntax = \"proto3\"; package p; {body}"), &[])
                .unwrap()
                .file
        };
        let old = v("message M { int32 a = 1; string b = 2; }");
        assert!(differences(
            &v("message M { int32 a = 1; string b = 2; int64 c = 3; }"),
            &old
        )
        .is_empty());
        assert!(differences(&v("message M { int32 a = 1; }"), &old).is_empty());
        assert!(differences(&v("message M { int64 a = 1; bytes b = 2; }"), &old).is_empty());
        let d = differences(&v("message M { double a = 1; string b = 2; }"), &old);
        assert!(d[0].starts_with("FIELD_SCALAR_KIND_CHANGED"), "{d:?}");
        let d = differences(
            &v("message N { int32 a = 1; } message M { N a = 1; }"),
            &old,
        );
        assert!(d[0].starts_with("FIELD_KIND_CHANGED"), "{d:?}");
        let d = differences(&v("message M2 { int32 a = 1; }"), &old);
        assert!(d[0].starts_with("MESSAGE_REMOVED"), "{d:?}");
        let d = differences(
            &v("message M { repeated int32 a = 1; string b = 2; }"),
            &old,
        );
        assert!(d[0].starts_with("FIELD_LABEL_CHANGED"), "{d:?}");
        let d = differences(
            &compile(
                "syntax = \"proto3\"; package q; message M { int32 a = 1; }",
                &[],
            )
            .unwrap()
            .file,
            &old,
        );
        assert!(d[0].starts_with("PACKAGE_CHANGED"), "{d:?}");
    }
}
