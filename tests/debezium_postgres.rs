//! Real Debezium: PostgreSQL with logical decoding, Kafka Connect with Debezium's PostgreSQL
//! connector (JsonConverter with schemas, the default of a Connect deployment), lakesink
//! upserting into a Delta table. SQL on a real table (a snapshot of existing rows, inserts,
//! updates, deletes) must end with the Delta table equal to `SELECT * FROM` the source table,
//! row by row and value by value, read back by python deltalake.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn pg_port() -> String {
    need("LAKESINK_TEST_PG_PORT")
}

/// Runs SQL with psql; returns stdout (unaligned, tuples only).
fn sql(statements: &str) -> String {
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

/// Registers a Debezium PostgreSQL connector for `schema` through Connect's REST API.
async fn start_connector(name: &str, prefix: &str, schema: &str) {
    let body = json!({
        "name": name,
        "config": {
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
            "publication.name": format!("{}_pub", name.replace('-', "_")),
            "publication.autocreate.mode": "filtered",
            "snapshot.mode": "initial",
            "decimal.handling.mode": "string",
        }
    });
    let r = reqwest::Client::new()
        .post(format!("{}/connectors", need("LAKESINK_TEST_CONNECT")))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert!(status.is_success(), "{status}: {}", r.text().await.unwrap());
}

async fn stop_connector(name: &str) {
    let _ = reqwest::Client::new()
        .delete(format!(
            "{}/connectors/{name}",
            need("LAKESINK_TEST_CONNECT")
        ))
        .send()
        .await;
}

/// The source table as JSON rows by id.
fn source_rows(table: &str) -> BTreeMap<i64, Value> {
    sql(&format!("SELECT row_to_json(t) FROM {table} t ORDER BY id"))
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_i64().unwrap(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_changes_through_debezium_equal_the_source_table_in_delta() {
    let schema = unique("shop").replace('-', "_");
    let prefix = unique("pg");
    let table = format!("{schema}.customers");
    sql(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {table} (id bigint PRIMARY KEY, name text NOT NULL, credit numeric(12,2),
                               active boolean NOT NULL DEFAULT true);
         INSERT INTO {table} SELECT i, 'snapshot ' || i, i * 1.25, i % 2 = 0
           FROM generate_series(1, 50) i;"
    ));
    let connector = unique("dbz");
    start_connector(&connector, &prefix, &schema).await;
    let topic = format!("{prefix}.{schema}.customers");

    // Streamed changes after the snapshot.
    sql(&format!(
        "INSERT INTO {table} SELECT i, 'new ' || i, i * 0.5, true FROM generate_series(51, 120) i;
         UPDATE {table} SET name = name || ' (updated)', credit = credit + 1 WHERE id % 3 = 0;
         DELETE FROM {table} WHERE id % 7 = 0;
         UPDATE {table} SET active = NOT active WHERE id BETWEEN 10 AND 20;"
    ));
    let want = source_rows(&table);

    let store = Store::local("customers");
    let group = unique("g");
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "topic.metadata.refresh.interval.ms" = "1000" }}

[[sink]]
name = "customers"
topics = ["{topic}"]
kind = "delta"
table = "{url}"
mode = "upsert"
key = ["id"]
format = "debezium-json"
json_envelope = "connect"
schema = {{ id = "long", name = "string", credit = "decimal(12,2)", active = "boolean" }}
flush = {{ max_rows = 1000, max_latency = "1s" }}
"#,
        kafka = kafka(),
        membership = group_properties(),
        url = store.url,
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let start = Instant::now();
    let log_dir =
        std::path::Path::new(store.url.strip_prefix("file://").unwrap()).join("_delta_log");
    let got = loop {
        let t = if log_dir.exists() {
            store.read_delta(&[])
        } else {
            json!({})
        };
        let rows: BTreeMap<i64, Value> = t["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| (r["id"].as_i64().unwrap(), r.clone()))
                    .collect()
            })
            .unwrap_or_default();
        if rows.len() == want.len() && rows.keys().eq(want.keys()) {
            break rows;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the table has {} rows, the source {}; log:\n{}",
            rows.len(),
            want.len(),
            proc_.log()
        );
        if let Some(s) = proc_.child.try_wait().unwrap() {
            panic!("lakesink exited ({s}):\n{}", proc_.log());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    proc_.stop();
    stop_connector(&connector).await;
    let mut compared = 0;
    for (id, src) in &want {
        let row = &got[id];
        for col in ["name", "credit", "active"] {
            let (a, b) = (&src[col], &row[col]);
            let same = match (a, b) {
                // NUMERIC: psql prints 2.50, the table holds the decimal "2.50".
                (Value::Number(x), _) => {
                    let table = b
                        .as_f64()
                        .or_else(|| b.as_str().and_then(|t| t.parse().ok()));
                    table.is_some() && table == x.as_f64()
                }
                _ => a == b,
            };
            assert!(same, "row {id} column {col}: source {a}, table {b}");
            compared += 1;
        }
    }
    println!(
        "debezium: {} rows and {compared} values equal the source table",
        want.len()
    );
}
