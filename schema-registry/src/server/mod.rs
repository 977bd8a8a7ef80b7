//! A small Confluent-compatible registry server (`lakesink registry serve`).
//!
//! Implements the REST subset producers, serializers and lakesink use: schemas by id, subjects,
//! versions (including `latest`), registration (idempotent: the same schema under a subject
//! returns the same id), lookup, and global / per-subject compatibility settings. State is kept
//! in memory and, when a data directory is given, persisted to `registry.json` with an atomic
//! rename after every change.
//!
//! Invariants: ids are never reused; a schema string identical (after JSON normalisation) to an
//! existing one gets the existing id, whatever the subject.
//!
//! Compatibility (global, per subject; NONE, BACKWARD, FORWARD, FULL and the TRANSITIVE forms;
//! default BACKWARD as in Confluent) is enforced on registration with Avro schema-resolution
//! rules ([`crate::compat`]): an incompatible schema gets HTTP 409 / error code 409 naming the
//! problem. `POST /compatibility/subjects/{s}/versions/{v}` tests a schema without registering.
//! Protobuf schemas (text or base64 descriptors, imports as references) are compiled on
//! registration and checked with Confluent's Protobuf rules ([`crate::protobuf::differences`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::references::Reference;

mod protobuf;

const LEVELS: &[&str] = &[
    "NONE",
    "BACKWARD",
    "BACKWARD_TRANSITIVE",
    "FORWARD",
    "FORWARD_TRANSITIVE",
    "FULL",
    "FULL_TRANSITIVE",
];

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Data {
    next_id: u32,
    /// id -> (schema type, schema)
    schemas: BTreeMap<u32, StoredSchema>,
    /// subject -> ids, one per version (version = index + 1)
    subjects: BTreeMap<String, Vec<u32>>,
    global_compatibility: Option<String>,
    subject_compatibility: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSchema {
    schema_type: String,
    schema: String,
    canonical: String,
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Debug)]
struct Registry {
    data: Mutex<Data>,
    file: Option<PathBuf>,
}

type Shared = Arc<Registry>;

/// A registry error in Confluent's format: `{"error_code": 40401, "message": "..."}`.
struct ApiError(StatusCode, i64, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({ "error_code": self.1, "message": self.2 })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn subject_not_found(s: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        40401,
        format!("Subject '{s}' not found."),
    )
}

impl Registry {
    fn open(dir: Option<PathBuf>) -> std::io::Result<Self> {
        let file = dir.map(|d| d.join("registry.json"));
        let mut data: Data = match &file {
            Some(f) if f.exists() => serde_json::from_slice(&std::fs::read(f)?)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            Some(f) => {
                if let Some(parent) = f.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                Data::default()
            }
            None => Data::default(),
        };
        // Compared in today's normalized form, whatever form an older version stored.
        for s in data.schemas.values_mut() {
            if let Ok(c) = canonical(&s.schema_type, &s.schema) {
                s.canonical = c;
            }
        }
        Ok(Self {
            data: Mutex::new(data),
            file,
        })
    }

    fn persist(&self, data: &Data) -> Result<(), ApiError> {
        let Some(f) = &self.file else { return Ok(()) };
        let tmp = f.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec_pretty(data)?)?;
            std::fs::rename(&tmp, f)
        };
        write().map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                50001,
                format!("cannot persist the registry: {e}"),
            )
        })
    }
}

fn canonical(schema_type: &str, schema: &str) -> Result<String, ApiError> {
    let invalid = |m: String| ApiError(StatusCode::UNPROCESSABLE_ENTITY, 42201, m);
    if schema_type == "PROTOBUF" {
        // `.proto` text or a base64 descriptor: compared as written, less outer whitespace.
        return Ok(schema.trim().to_string());
    }
    let v: Value = serde_json::from_str(schema)
        .map_err(|e| invalid(format!("Invalid schema: not JSON: {e}")))?;
    if schema_type == "AVRO" {
        let ok = match &v {
            Value::String(_) | Value::Array(_) => true,
            Value::Object(o) => o.contains_key("type"),
            _ => false,
        };
        if !ok {
            return Err(invalid(
                "Invalid schema: an Avro schema needs a `type`".into(),
            ));
        }
        return Ok(normalized(&v).to_string());
    }
    Ok(v.to_string())
}

/// The form two Avro schemas are compared in (to find one already registered): object keys
/// sorted at every level, whitespace gone, and `{"type": "int"}` written `"int"`, so schemas that
/// differ only in layout are the same schema, while defaults, docs, aliases and every other
/// attribute still tell schemas apart.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            if let (1, Some(Value::String(t))) = (o.len(), o.get("type")) {
                return Value::String(t.clone());
            }
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), normalized(&o[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

#[derive(Deserialize)]
struct RegisterBody {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

#[derive(Deserialize)]
struct CompatBody {
    compatibility: String,
}

async fn schema_by_id(State(r): State<Shared>, Path(id): Path<u32>) -> ApiResult<Value> {
    let data = r.data.lock().expect("registry");
    let s = data.schemas.get(&id).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            40403,
            format!("Schema {id} not found"),
        )
    })?;
    let mut body = json!({ "schema": s.schema });
    if s.schema_type != "AVRO" {
        body["schemaType"] = json!(s.schema_type);
    }
    if !s.references.is_empty() {
        body["references"] = json!(s.references);
    }
    Ok(Json(body))
}

async fn id_versions(State(r): State<Shared>, Path(id): Path<u32>) -> ApiResult<Value> {
    let data = r.data.lock().expect("registry");
    let out: Vec<Value> = data
        .subjects
        .iter()
        .flat_map(|(s, ids)| {
            ids.iter()
                .enumerate()
                .filter(|(_, i)| **i == id)
                .map(move |(v, _)| json!({ "subject": s, "version": v + 1 }))
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

async fn subjects(State(r): State<Shared>) -> ApiResult<Vec<String>> {
    let data = r.data.lock().expect("registry");
    Ok(Json(data.subjects.keys().cloned().collect()))
}

async fn versions(State(r): State<Shared>, Path(subject): Path<String>) -> ApiResult<Vec<u32>> {
    let data = r.data.lock().expect("registry");
    let ids = data
        .subjects
        .get(&subject)
        .ok_or_else(|| subject_not_found(&subject))?;
    Ok(Json((1..=ids.len() as u32).collect()))
}

fn version_body(data: &Data, subject: &str, version: usize) -> Value {
    let id = data.subjects[subject][version - 1];
    let s = &data.schemas[&id];
    let mut body = json!({ "subject": subject, "version": version, "id": id, "schema": s.schema });
    if s.schema_type != "AVRO" {
        body["schemaType"] = json!(s.schema_type);
    }
    if !s.references.is_empty() {
        body["references"] = json!(s.references);
    }
    body
}

async fn version(
    State(r): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> ApiResult<Value> {
    let data = r.data.lock().expect("registry");
    let ids = data
        .subjects
        .get(&subject)
        .ok_or_else(|| subject_not_found(&subject))?;
    let v = match version.as_str() {
        "latest" | "-1" => ids.len(),
        n => n.parse::<usize>().map_err(|_| {
            ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                42202,
                format!("The specified version '{n}' is not a valid version id."),
            )
        })?,
    };
    if v == 0 || v > ids.len() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        ));
    }
    Ok(Json(version_body(&data, &subject, v)))
}

async fn register(
    State(r): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<RegisterBody>,
) -> ApiResult<Value> {
    let schema_type = body.schema_type.unwrap_or_else(|| "AVRO".into());
    let canon = canonical(&schema_type, &body.schema)?;
    let mut data = r.data.lock().expect("registry");
    let existing = data
        .schemas
        .iter()
        .find(|(_, s)| {
            s.canonical == canon && s.schema_type == schema_type && s.references == body.references
        })
        .map(|(id, _)| *id);
    for r in &body.references {
        if lookup_version(&data, &r.subject, r.version).is_none() {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                format!(
                    "Invalid schema: reference `{}` points to subject `{}` version {}, which does not exist",
                    r.name, r.subject, r.version
                ),
            ));
        }
    }
    if schema_type == "AVRO" {
        // A schema is stored only if Avro can parse it, with its references inlined (Confluent
        // answers 42201 for one it cannot parse).
        let full = resolved(&data, &canon, &body.references);
        if let Err(e) = apache_avro::Schema::parse(&full) {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                42201,
                format!("Invalid schema: {e}"),
            ));
        }
    }
    let proto = if schema_type == "PROTOBUF" {
        Some(protobuf::compile_stored(&data, &canon, &body.references)?)
    } else {
        None
    };
    if let Some(id) = existing {
        if data.subjects.get(&subject).is_some_and(|v| v.contains(&id)) {
            return Ok(Json(json!({ "id": id })));
        }
    }
    let problems = match (&proto, schema_type.as_str()) {
        (Some(new), _) => protobuf::problems(&data, &subject, new, usize::MAX),
        (None, "AVRO") => {
            let earlier = avro_versions(&data, &subject, usize::MAX);
            let new = resolved(&data, &canon, &body.references);
            effective_level(&data, &subject).check(&new, &earlier)
        }
        _ => Vec::new(),
    };
    if !problems.is_empty() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            409,
            format!(
                "Schema being registered is incompatible with an earlier schema for subject \"{subject}\": {}",
                problems.join("; ")
            ),
        ));
    }
    let id = match existing {
        Some(id) => id,
        None => {
            data.next_id += 1;
            let id = data.next_id;
            data.schemas.insert(
                id,
                StoredSchema {
                    schema_type,
                    schema: body.schema,
                    canonical: canon,
                    references: body.references,
                },
            );
            id
        }
    };
    data.subjects.entry(subject).or_default().push(id);
    r.persist(&data)?;
    Ok(Json(json!({ "id": id })))
}

/// The schema id of `subject` version `version` (`-1`: latest).
fn lookup_version(data: &Data, subject: &str, version: i64) -> Option<u32> {
    let ids = data.subjects.get(subject)?;
    let v = if version == -1 {
        ids.len()
    } else {
        usize::try_from(version).ok()?
    };
    ids.get(v.checked_sub(1)?).copied()
}

/// A schema with its references inlined (recursively), for compatibility checks.
fn resolved(data: &Data, canonical: &str, references: &[Reference]) -> Value {
    let main: Value = serde_json::from_str(canonical).unwrap_or(Value::Null);
    if references.is_empty() {
        return main;
    }
    let mut defs = std::collections::HashMap::new();
    for r in references {
        if let Some(s) =
            lookup_version(data, &r.subject, r.version).and_then(|id| data.schemas.get(&id))
        {
            defs.insert(r.name.clone(), resolved(data, &s.canonical, &s.references));
        }
    }
    crate::references::inline(&main, &defs)
}

fn effective_level(data: &Data, subject: &str) -> crate::compat::Level {
    data.subject_compatibility
        .get(subject)
        .or(data.global_compatibility.as_ref())
        .and_then(|l| crate::compat::Level::parse(l))
        .unwrap_or(crate::compat::Level::Backward)
}

/// The Avro versions of `subject` up to `version` (1-based, inclusive), oldest first.
fn avro_versions(data: &Data, subject: &str, version: usize) -> Vec<Value> {
    data.subjects
        .get(subject)
        .map(|ids| {
            ids.iter()
                .take(version)
                .filter_map(|id| data.schemas.get(id))
                .filter(|s| s.schema_type == "AVRO")
                .map(|s| resolved(data, &s.canonical, &s.references))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct VerboseQuery {
    verbose: Option<bool>,
}

async fn compatibility(
    State(r): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<VerboseQuery>,
    Json(body): Json<RegisterBody>,
) -> ApiResult<Value> {
    let schema_type = body.schema_type.unwrap_or_else(|| "AVRO".into());
    let canon = canonical(&schema_type, &body.schema)?;
    let data = r.data.lock().expect("registry");
    let ids = data
        .subjects
        .get(&subject)
        .ok_or_else(|| subject_not_found(&subject))?;
    let upto = match version.as_str() {
        "latest" | "-1" => ids.len(),
        n => n
            .parse::<usize>()
            .ok()
            .filter(|v| *v >= 1 && *v <= ids.len())
            .ok_or_else(|| {
                ApiError(
                    StatusCode::NOT_FOUND,
                    40402,
                    format!("Version {version} not found."),
                )
            })?,
    };
    let existing = avro_versions(&data, &subject, upto);
    let problems = if schema_type == "AVRO" {
        effective_level(&data, &subject).check(
            &serde_json::from_str(&canon).expect("canonical JSON"),
            &existing,
        )
    } else if schema_type == "PROTOBUF" {
        let new = protobuf::compile_stored(&data, &canon, &body.references)?;
        protobuf::problems(&data, &subject, &new, upto)
    } else {
        Vec::new()
    };
    let mut body = json!({ "is_compatible": problems.is_empty() });
    if q.verbose.unwrap_or(false) {
        body["messages"] = json!(problems);
    }
    Ok(Json(body))
}

async fn lookup(
    State(r): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<RegisterBody>,
) -> ApiResult<Value> {
    let schema_type = body.schema_type.unwrap_or_else(|| "AVRO".into());
    let canon = canonical(&schema_type, &body.schema)?;
    let data = r.data.lock().expect("registry");
    let ids = data
        .subjects
        .get(&subject)
        .ok_or_else(|| subject_not_found(&subject))?;
    let pos = ids
        .iter()
        .position(|id| data.schemas[id].canonical == canon)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, 40403, "Schema not found".into()))?;
    Ok(Json(version_body(&data, &subject, pos + 1)))
}

fn level(body: &CompatBody) -> Result<String, ApiError> {
    let l = body.compatibility.to_ascii_uppercase();
    if LEVELS.contains(&l.as_str()) {
        Ok(l)
    } else {
        Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            42203,
            format!("Invalid compatibility level {}", body.compatibility),
        ))
    }
}

async fn get_config(State(r): State<Shared>) -> ApiResult<Value> {
    let data = r.data.lock().expect("registry");
    let l = data
        .global_compatibility
        .clone()
        .unwrap_or_else(|| "BACKWARD".into());
    Ok(Json(json!({ "compatibilityLevel": l })))
}

async fn put_config(State(r): State<Shared>, Json(body): Json<CompatBody>) -> ApiResult<Value> {
    let l = level(&body)?;
    let mut data = r.data.lock().expect("registry");
    data.global_compatibility = Some(l.clone());
    r.persist(&data)?;
    Ok(Json(json!({ "compatibility": l })))
}

async fn get_subject_config(
    State(r): State<Shared>,
    Path(subject): Path<String>,
) -> ApiResult<Value> {
    let data = r.data.lock().expect("registry");
    let l = data
        .subject_compatibility
        .get(&subject)
        .ok_or_else(|| subject_not_found(&subject))?;
    Ok(Json(json!({ "compatibilityLevel": l })))
}

async fn put_subject_config(
    State(r): State<Shared>,
    Path(subject): Path<String>,
    Json(body): Json<CompatBody>,
) -> ApiResult<Value> {
    let l = level(&body)?;
    let mut data = r.data.lock().expect("registry");
    data.subject_compatibility.insert(subject, l.clone());
    r.persist(&data)?;
    Ok(Json(json!({ "compatibility": l })))
}

/// The registry's HTTP routes over a state persisted to `dir` (in memory when `None`).
pub fn router(dir: Option<PathBuf>) -> std::io::Result<Router> {
    let state: Shared = Arc::new(Registry::open(dir)?);
    Ok(Router::new()
        .route("/", get(|| async { Json(json!({})) }))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/versions", get(id_versions))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(version))
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(compatibility),
        )
        .route("/config", get(get_config).put(put_config))
        .route(
            "/config/{subject}",
            get(get_subject_config).put(put_subject_config),
        )
        .with_state(state))
}

/// Binds `addr` and serves the registry in the background. Returns the bound address (useful
/// with port 0) and the server task.
pub async fn spawn(
    addr: SocketAddr,
    dir: Option<PathBuf>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let app = router(dir)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((bound, task))
}

#[cfg(test)]
mod tests;
