//! lakesink: Kafka topics into a data lake and SQL warehouses, exactly once.
//!
//! Layout: [`config`] (TOML, two-phase validation; a leaf), [`source`] (consumer group, rebalance
//! bridge, topic ids), [`decode`] (records to Arrow), [`pipeline`] (per-partition workers,
//! flushing, commit driving), [`metrics`] (the counters the pipeline updates; a leaf),
//! [`telemetry`] (serves them, and readiness), [`app`] (the commands: run, check, demo, bench).
//! Sinks live in the `sinks` crate and never see Kafka; the registry client lives in
//! `schema-registry`.

pub mod app;
pub mod auth;
pub mod config;
pub mod decode;
pub mod metrics;
pub mod pipeline;
pub mod source;
pub mod telemetry;
pub mod workload;
