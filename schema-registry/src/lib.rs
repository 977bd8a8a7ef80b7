//! A Confluent-compatible schema registry client and a small compatible server.
//!
//! - [`wire`]: the Confluent wire format (magic byte 0, 4-byte big-endian schema id), pure.
//! - [`client`]: REST client with basic auth, timeouts, retries on connect errors and 5xx, and a
//!   cache by id that never expires (ids are immutable) with one in-flight fetch per id.
//! - [`protobuf`]: Protobuf schemas (text or descriptor) compiled with their imports, message
//!   paths, and Confluent's Protobuf compatibility rules.
//! - [`server`]: `lakesink registry serve`, the subset of the REST API that producers and
//!   lakesink use, persisted to a directory. The demo and the tests run against it.

#![warn(missing_docs)]

pub mod client;
pub mod compat;
pub mod protobuf;
pub mod references;
pub mod server;
pub mod wire;

use std::fmt;

pub use client::{RegistryClient, RegistryConfig};

/// The registry crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A schema id assigned by the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaId(pub u32);

impl fmt::Display for SchemaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A schema as the registry returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredSchema {
    /// The schema's global id.
    pub id: SchemaId,
    /// `AVRO` (the default), `JSON` or `PROTOBUF`.
    pub schema_type: String,
    /// The schema text.
    pub schema: String,
    /// Protobuf only: the files the schema imports, transitively, as (import name, schema).
    /// Avro and JSON references are inlined into `schema` instead.
    pub imports: Vec<(String, String)>,
}

/// Why a registry call failed; [`Error::is_retryable`] says whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No schema has this id (the record names a schema of another registry?).
    #[error("schema {id} not found in the registry at {url} (error code {code})")]
    SchemaNotFound {
        /// The schema id.
        id: SchemaId,
        /// The registry's URL.
        url: String,
        /// The error code.
        code: i64,
    },

    /// No subject of this name.
    #[error("subject `{subject}` not found in the registry at {url} (error code {code})")]
    SubjectNotFound {
        /// The subject.
        subject: String,
        /// The registry's URL.
        url: String,
        /// The error code.
        code: i64,
    },

    #[error(
        "the registry at {url} rejected the request: {message} (HTTP {status}, error code {code})"
    )]
    /// The registry refused the request.
    Rejected {
        /// The registry's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The error code.
        code: i64,
        /// The server's message.
        message: String,
    },

    /// The schema breaks the subject's compatibility level.
    #[error("schema for subject `{subject}` is incompatible with an earlier version (registry {url}): {message}")]
    Incompatible {
        /// The subject.
        subject: String,
        /// The registry's URL.
        url: String,
        /// The server's message.
        message: String,
    },

    #[error(
        "invalid schema for subject `{subject}` (registry {url}, error code 42201): {message}"
    )]
    /// The schema does not parse.
    InvalidSchema {
        /// The subject.
        subject: String,
        /// The registry's URL.
        url: String,
        /// The server's message.
        message: String,
    },

    /// The TLS files could not be read or used.
    #[error("TLS setup for the registry at {url} failed: {reason}")]
    Tls {
        /// The registry's URL.
        url: String,
        /// Why.
        reason: String,
    },

    /// The registry could not be reached, or answered 5xx.
    #[error("the registry at {url} is unreachable: {reason}")]
    Unreachable {
        /// The registry's URL.
        url: String,
        /// Why.
        reason: String,
    },

    /// The registry's answer could not be understood.
    #[error("invalid registry response from {url}: {reason}")]
    BadResponse {
        /// The registry's URL.
        url: String,
        /// Why.
        reason: String,
    },

    /// The record is not Confluent-framed.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

impl Error {
    /// Whether a retry can help (network errors and 5xx); 4xx answers are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Rejected { status, .. } => *status >= 500,
            _ => false,
        }
    }
}
