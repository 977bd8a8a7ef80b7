//! A Confluent-compatible schema registry client and a small compatible server.
//!
//! - [`wire`]: the Confluent wire format (magic byte 0, 4-byte big-endian schema id), pure.
//! - [`client`]: REST client with basic auth, timeouts, retries on connect errors and 5xx, and a
//!   cache by id that never expires (ids are immutable) with one in-flight fetch per id.
//! - [`server`]: `lakesink registry serve`, the subset of the REST API that producers and
//!   lakesink use, persisted to a directory. The demo and the tests run against it.

pub mod client;
pub mod compat;
pub mod references;
pub mod server;
pub mod wire;

use std::fmt;

pub use client::{RegistryClient, RegistryConfig};

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
    pub id: SchemaId,
    /// `AVRO` (the default), `JSON` or `PROTOBUF`.
    pub schema_type: String,
    pub schema: String,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("schema {id} not found in the registry at {url} (error code {code})")]
    SchemaNotFound {
        id: SchemaId,
        url: String,
        code: i64,
    },

    #[error("subject `{subject}` not found in the registry at {url} (error code {code})")]
    SubjectNotFound {
        subject: String,
        url: String,
        code: i64,
    },

    #[error(
        "the registry at {url} rejected the request: {message} (HTTP {status}, error code {code})"
    )]
    Rejected {
        url: String,
        status: u16,
        code: i64,
        message: String,
    },

    #[error("schema for subject `{subject}` is incompatible with an earlier version (registry {url}): {message}")]
    Incompatible {
        subject: String,
        url: String,
        message: String,
    },

    #[error(
        "invalid schema for subject `{subject}` (registry {url}, error code 42201): {message}"
    )]
    InvalidSchema {
        subject: String,
        url: String,
        message: String,
    },

    #[error("TLS setup for the registry at {url} failed: {reason}")]
    Tls { url: String, reason: String },

    #[error("the registry at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },

    #[error("invalid registry response from {url}: {reason}")]
    BadResponse { url: String, reason: String },

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
