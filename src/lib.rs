//! lakesink: Kafka topics into a data lake and SQL warehouses, exactly once.
//!
//! Layout: [`config`] (TOML, two-phase validation; a leaf), [`kafka`] (every use of the Kafka
//! client: consumer group, rebalances, topic ids, the dead-letter producer, logins),
//! [`decode`] (records to Arrow), [`pipeline`] (the end-to-end protocol by stage: the
//! supervisor, partition workers, flushing, commit driving; never names Kafka), [`metrics`]
//! (the counters the pipeline updates; a leaf),
//! [`telemetry`] (serves them, and readiness), [`app`] (the commands: run, check, demo, bench).
//! Sinks live in the `sinks` crate and never see Kafka; the registry client lives in
//! `schema-registry`.

pub mod app;
pub mod aws;
pub mod config;
pub mod decode;
pub mod error;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod telemetry;
