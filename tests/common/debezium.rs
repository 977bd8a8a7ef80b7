//! Real Debezium helpers: SQL on the test PostgreSQL (`psql`), and Debezium PostgreSQL
//! connectors registered with the test Kafka Connect, deleted (with their replication slots)
//! when the test ends.

use std::process::Command;

use serde_json::{json, Value};

use super::need;

pub fn pg_port() -> String {
    need("LAKESINK_TEST_PG_PORT")
}

/// Runs SQL with psql; returns stdout (unaligned, tuples only).
pub fn sql(statements: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg_port(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", statements])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The publication a connector named `name` creates.
pub fn publication(name: &str) -> String {
    format!("{}_pub", name.replace('-', "_"))
}

/// Registers a Debezium PostgreSQL connector for `schema` through Connect's REST API (JSON
/// with schemas, truncates sent, transaction metadata on); `extra` adds or replaces settings.
/// The returned guard deletes it.
pub async fn start_connector(name: &str, prefix: &str, schema: &str, extra: Value) -> Connector {
    let mut config = json!({
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": "127.0.0.1",
        "database.port": pg_port(),
        "database.user": "postgres",
        "database.password": "unused",
        "database.dbname": "postgres",
        "topic.prefix": prefix,
        "schema.include.list": schema,
        "slot.name": name.replace('-', "_"),
        "publication.name": publication(name),
        "publication.autocreate.mode": "filtered",
        "snapshot.mode": "initial",
        // Truncates are sent (Debezium skips them by default), with the transaction block.
        "skipped.operations": "none",
        // The slot goes with the connector: PostgreSQL has a fixed number of them.
        "slot.drop.on.stop": "true",
        "provide.transaction.metadata": "true",
    });
    if let Value::Object(more) = extra {
        config.as_object_mut().unwrap().extend(more);
    }
    let body = json!({ "name": name, "config": config });
    let r = reqwest::Client::new()
        .post(format!("{}/connectors", need("LAKESINK_TEST_CONNECT")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
    Connector(name.to_string())
}

/// Deletes its connector (and so, with `slot.drop.on.stop`, its replication slot) when the
/// test ends, however it ends.
pub struct Connector(pub String);

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = Command::new("curl")
            .args(["-sf", "-X", "DELETE"])
            .arg(format!(
                "{}/connectors/{}",
                need("LAKESINK_TEST_CONNECT"),
                self.0
            ))
            .output();
    }
}

/// Fails the test with Connect's own words when the connector or its task failed.
pub async fn assert_connector_running(name: &str) {
    let status: Value = reqwest::Client::new()
        .get(format!(
            "{}/connectors/{name}/status",
            need("LAKESINK_TEST_CONNECT")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let failed = status["connector"]["state"] == "FAILED"
        || status["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["state"] == "FAILED");
    assert!(!failed, "the Debezium connector failed: {status:#}");
}
