//! The server's Protobuf side: a registered schema compiles with the files its references name
//! (an invalid one is refused with 42201, as Confluent does), and a new version is checked
//! against the subject's earlier Protobuf versions under the subject's compatibility level.

use axum::http::StatusCode;

use super::{effective_level, lookup_version, ApiError, Data};
use crate::protobuf::{compile, differences, Compiled};
use crate::references::Reference;

/// The files `references` name, and the files those import, each once (import name, schema).
fn files(data: &Data, references: &[Reference], out: &mut Vec<(String, String)>, depth: usize) {
    if depth > 16 {
        return;
    }
    for r in references {
        if out.iter().any(|(n, _)| *n == r.name) {
            continue;
        }
        if let Some(s) =
            lookup_version(data, &r.subject, r.version).and_then(|id| data.schemas.get(&id))
        {
            out.push((r.name.clone(), s.schema.clone()));
            files(data, &s.references, out, depth + 1);
        }
    }
}

/// Compiles a Protobuf schema with its references; 42201 when it does not compile.
pub(super) fn compile_stored(
    data: &Data,
    schema: &str,
    references: &[Reference],
) -> Result<Compiled, ApiError> {
    let mut imports = Vec::new();
    files(data, references, &mut imports, 0);
    compile(schema, &imports).map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            42201,
            format!("Invalid schema: {e}"),
        )
    })
}

/// What keeps `new` from being registered after the subject's first `upto` versions.
pub(super) fn problems(data: &Data, subject: &str, new: &Compiled, upto: usize) -> Vec<String> {
    let earlier: Vec<Compiled> = data
        .subjects
        .get(subject)
        .map(|ids| {
            ids.iter()
                .take(upto)
                .filter_map(|id| data.schemas.get(id))
                .filter(|s| s.schema_type == "PROTOBUF")
                .filter_map(|s| compile_stored(data, &s.schema, &s.references).ok())
                .collect()
        })
        .unwrap_or_default();
    effective_level(data, subject).check_with(new, &earlier, |reader, writer| {
        let d = differences(&reader.file, &writer.file);
        if d.is_empty() {
            Ok(())
        } else {
            Err(d.join(", "))
        }
    })
}
