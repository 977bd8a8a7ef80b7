//! A whole PostgreSQL database through real Debezium into ONE sink per destination, none of
//! which names a table or a key: a `topics_regex` Delta sink (`{db}/{table}`), a Databend sink
//! (`{table}`, one table renamed in `[sink.tables]`) upserting with the keys of each message, and
//! a Parquet sink keeping the change log. Five source tables with different schemas and keys
//! (one composite, one text), one of them created while lakesink runs; inserts, updates,
//! deletes, a column added, a TRUNCATE. Debezium's heartbeat and transaction topics match the
//! pattern and are skipped by rule. Each Delta and Databend table must equal its source table
//! value by value (read by python deltalake and the Databend engine); each Parquet table must
//! hold every row change of its topic exactly once, reconciled by (partition, offset) against
//! the topic as a Kafka consumer reads it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use common::databend::rows as databend_rows;
use common::debezium::{assert_connector_running, publication, sql, start_connector};
use common::*;
use serde_json::{json, Value};

/// Source tables: name, DDL columns, key columns, the columns compared.
struct Table {
    name: &'static str,
    ddl: &'static str,
    key: &'static [&'static str],
    columns: &'static [&'static str],
}

const TABLES: [Table; 5] = [
    Table {
        name: "customers",
        ddl: "id bigint PRIMARY KEY, name text NOT NULL, vip boolean",
        key: &["id"],
        columns: &["id", "name", "vip"],
    },
    Table {
        name: "products",
        ddl: "sku text PRIMARY KEY, title text, price numeric(10,2)",
        key: &["sku"],
        columns: &["sku", "title", "price"],
    },
    Table {
        name: "orders",
        ddl: "id bigint PRIMARY KEY, customer_id bigint, status text, total numeric(12,2)",
        key: &["id"],
        columns: &["id", "customer_id", "status", "total"],
    },
    Table {
        name: "order_lines",
        ddl: "order_id bigint, line_no int, sku text, qty int, PRIMARY KEY (order_id, line_no)",
        key: &["order_id", "line_no"],
        columns: &["order_id", "line_no", "sku", "qty"],
    },
    Table {
        name: "suppliers",
        ddl: "code text PRIMARY KEY, name text, rating int",
        key: &["code"],
        columns: &["code", "name", "rating"],
    },
];

/// Rows by key (the key's values joined by `|`), each column as text (or null).
type Rows = BTreeMap<String, BTreeMap<String, Option<String>>>;

fn row_key(t: &Table, row: &BTreeMap<String, Option<String>>) -> String {
    t.key
        .iter()
        .map(|k| row[*k].clone().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("|")
}

fn source_rows(schema: &str, t: &Table, columns: &[&str]) -> Rows {
    let object: Vec<String> = columns
        .iter()
        .map(|c| format!("'{c}', {c}::text"))
        .collect();
    sql(&format!(
        "SELECT json_build_object({}) FROM {schema}.{}",
        object.join(", "),
        t.name
    ))
    .lines()
    .map(|l| {
        let v: Value = serde_json::from_str(l).unwrap();
        let row: BTreeMap<String, Option<String>> = columns
            .iter()
            .map(|c| (c.to_string(), v[c].as_str().map(String::from)))
            .collect();
        (row_key(t, &row), row)
    })
    .collect()
}

fn delta_rows(url: &str, t: &Table, columns: &[&str]) -> Rows {
    let path = url.strip_prefix("file://").unwrap();
    if !std::path::Path::new(path).join("_delta_log").exists() {
        return Rows::new();
    }
    let out = Command::new(python())
        .arg(py_script("canonical_delta.py"))
        .arg(url)
        .output()
        .expect("run canonical_delta.py");
    assert!(
        out.status.success(),
        "canonical_delta.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["schema"].get("_key").is_none(),
        "the message key's struct is never stored: {}",
        v["schema"]
    );
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let row: BTreeMap<String, Option<String>> = columns
                .iter()
                .map(|c| (c.to_string(), r[c].as_str().map(String::from)))
                .collect();
            (row_key(t, &row), row)
        })
        .collect()
}

async fn databend_table_rows(database: &str, table: &str, t: &Table, columns: &[&str]) -> Rows {
    let present: Vec<String> = databend_rows(
        "default",
        &format!(
            "SELECT name FROM system.columns WHERE database = '{database}' AND table = '{table}'"
        ),
    )
    .await
    .into_iter()
    .filter_map(|r| r.into_iter().next().flatten())
    .collect();
    if present.is_empty() {
        return Rows::new();
    }
    assert!(
        !present.iter().any(|c| c == "_key"),
        "the message key's struct is never stored: {present:?}"
    );
    let select: Vec<String> = columns
        .iter()
        .map(|c| match present.iter().any(|p| p == c) {
            true => format!("to_string(\"{c}\")"),
            false => "NULL".to_string(),
        })
        .collect();
    databend_rows(
        database,
        &format!("SELECT {} FROM \"{table}\"", select.join(", ")),
    )
    .await
    .into_iter()
    .map(|r| {
        let row: BTreeMap<String, Option<String>> =
            columns.iter().map(|c| c.to_string()).zip(r).collect();
        (row_key(t, &row), row)
    })
    .collect()
}

fn compare(what: &str, want: &Rows, got: &Rows) -> Result<usize, String> {
    if want.keys().ne(got.keys()) {
        let missing: Vec<_> = want
            .keys()
            .filter(|k| !got.contains_key(*k))
            .take(5)
            .collect();
        let extra: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(*k))
            .take(5)
            .collect();
        return Err(format!(
            "{what}: {} rows, the source {}; missing {missing:?}, extra {extra:?}",
            got.len(),
            want.len()
        ));
    }
    let mut values = 0;
    for (k, row) in want {
        for (c, v) in row {
            let g = got[k].get(c).cloned().flatten();
            if *v != g {
                return Err(format!(
                    "{what}: row {k} column {c}: source {v:?}, table {g:?}"
                ));
            }
            values += 1;
        }
    }
    Ok(values)
}

struct Run {
    schema: String,
    prefix: String,
    connector: String,
    lake: Store,
    database: String,
}

impl Run {
    fn topic(&self, t: &Table) -> String {
        format!("{}.{}.{}", self.prefix, self.schema, t.name)
    }

    fn delta_url(&self, t: &Table) -> String {
        format!("{}/delta/{}/{}", self.lake.url, self.schema, t.name)
    }

    fn databend_table(&self, t: &Table) -> &'static str {
        match t.name {
            "products" => "catalog",
            n => n,
        }
    }

    /// The columns of `t` now (a column added mid-run is compared once it exists).
    fn columns(&self, t: &Table, added: bool) -> Vec<&'static str> {
        let mut c = t.columns.to_vec();
        if added && t.name == "products" {
            c.push("weight");
        }
        c
    }

    /// Waits until every table of `tables` equals its source in Delta and in Databend.
    async fn converge(&self, phase: &str, tables: &[&Table], added: bool, proc_: &mut Lakesink) {
        assert_connector_running(&self.connector).await;
        let start = Instant::now();
        loop {
            let mut pending = Vec::new();
            let mut values = 0;
            for t in tables {
                let columns = self.columns(t, added);
                let want = source_rows(&self.schema, t, &columns);
                let delta = compare(
                    &format!("delta {}", t.name),
                    &want,
                    &delta_rows(&self.delta_url(t), t, &columns),
                );
                let databend = compare(
                    &format!("databend {}", t.name),
                    &want,
                    &databend_table_rows(&self.database, self.databend_table(t), t, &columns).await,
                );
                match (delta, databend) {
                    (Ok(a), Ok(b)) if a == b && !want.is_empty() => values += a,
                    (d, b) => pending.push(format!("{d:?} / {b:?}")),
                }
            }
            if pending.is_empty() {
                println!(
                    "{phase}: {} tables, {values} values equal the source in Delta and in Databend",
                    tables.len()
                );
                return;
            }
            if let Some(s) = proc_.child.try_wait().unwrap() {
                panic!("lakesink exited ({s}):\n{}", proc_.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(150),
                "{phase}: {}\nlog:\n{}",
                pending.join("\n"),
                proc_.log()
            );
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
    }
}

/// Every record of `topic` as (partition, offset, op): `None` for a tombstone.
fn topic_records(topic: &str) -> BTreeMap<(i32, i64), Option<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("log-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in md.topics()[0].partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
            .unwrap();
        if high > low {
            ends.insert(p.id(), high);
            tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low))
                .unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut out = BTreeMap::new();
    let start = Instant::now();
    while ends
        .iter()
        .any(|(p, end)| !out.contains_key(&(*p, end - 1)))
    {
        assert!(start.elapsed() < Duration::from_secs(60), "reading {topic}");
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            let op = m.payload().map(|v| {
                let v: Value = serde_json::from_slice(v).unwrap();
                v["payload"]["op"].as_str().unwrap_or_default().to_string()
            });
            out.insert((m.partition(), m.offset()), op);
        }
    }
    out
}

/// The Parquet change log of `t`: every row change of its topic exactly once.
fn assert_change_log(run: &Run, log_root: &str, t: &Table) -> usize {
    let dir = format!("{}/{}", log_root.strip_prefix("file://").unwrap(), t.name);
    let out = Command::new(python())
        .arg(py_script("dump_table.py"))
        .arg(&dir)
        .output()
        .expect("run dump_table.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen: BTreeMap<(i32, i64), u32> = BTreeMap::new();
    let mut ops = BTreeMap::new();
    for r in v["rows"].as_array().unwrap() {
        let at = (
            r["_kafka_partition"].as_i64().unwrap() as i32,
            r["_kafka_offset"].as_i64().unwrap(),
        );
        *seen.entry(at).or_default() += 1;
        ops.insert(at, r["_op"].as_str().map(String::from));
    }
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dup.is_empty(),
        "{}: rows twice in the change log: {dup:?}",
        t.name
    );
    let records = topic_records(&run.topic(t));
    let changes: BTreeMap<(i32, i64), String> = records
        .into_iter()
        .filter_map(|(at, op)| {
            op.filter(|o| ["c", "r", "u", "d"].contains(&o.as_str()))
                .map(|o| (at, o))
        })
        .collect();
    let want: BTreeSet<_> = changes.keys().collect();
    let got: BTreeSet<_> = seen.keys().collect();
    assert_eq!(
        want.difference(&got).count() + got.difference(&want).count(),
        0,
        "{}: change log vs topic: missing {:?}, extra {:?}",
        t.name,
        want.difference(&got).take(5).collect::<Vec<_>>(),
        got.difference(&want).take(5).collect::<Vec<_>>()
    );
    for (at, op) in &changes {
        assert_eq!(ops[at].as_deref(), Some(op.as_str()), "{} {at:?}", t.name);
    }
    changes.len()
}

fn lines_sql(schema: &str, from: i64, to: i64) -> String {
    format!(
        "INSERT INTO {schema}.order_lines SELECT o, l, 'sku-' || (o * l % 7), (o + l) % 5 + 1
           FROM generate_series({from}, {to}) o, generate_series(1, 3) l;"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_debezium_database_lands_table_by_table_in_one_sink_each() {
    let schema = unique("shop").replace('-', "_");
    let prefix = unique("pg");
    let mut ddl = format!("CREATE SCHEMA {schema};");
    for t in &TABLES[..4] {
        ddl += &format!("CREATE TABLE {schema}.{} ({});", t.name, t.ddl);
    }
    // The snapshot: rows that exist before the connector starts.
    ddl += &format!(
        "INSERT INTO {schema}.customers SELECT i, 'customer ' || i, i % 3 = 0 FROM generate_series(1, 40) i;
         INSERT INTO {schema}.products SELECT 'sku-' || i, 'product ' || i, i * 1.5 FROM generate_series(0, 6) i;
         INSERT INTO {schema}.orders SELECT i, i % 40 + 1, 'new', i * 10.25 FROM generate_series(1, 60) i;
         {}",
        lines_sql(&schema, 1, 60)
    );
    sql(&ddl);
    let connector = unique("dbz");
    let _connector = start_connector(
        &connector,
        &prefix,
        &schema,
        json!({ "heartbeat.interval.ms": "1000" }),
    )
    .await;

    let lake = Store::local("database");
    let log_root = format!("{}/log", lake.url);
    let database = unique("lake").replace('-', "_");
    let run = Run {
        schema: schema.clone(),
        prefix: prefix.clone(),
        connector: connector.clone(),
        lake: lake.clone(),
        database: database.clone(),
    };
    // One pattern for the database, Debezium's heartbeat and transaction topics included.
    let pattern = format!(
        "(__debezium-heartbeat\\.)?{}(\\..+)?",
        regex_escape(&prefix)
    );
    let common = format!(
        "topics_regex = '{pattern}'\nformat = \"debezium-json\"\njson_envelope = \"connect\"\n\
         flush = {{ max_rows = 500, max_latency = \"1s\" }}"
    );
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "topic.metadata.refresh.interval.ms" = "1000" }}

[[sink]]
name = "lake"
kind = "delta"
table = "{lake}/delta/{{db}}/{{table}}"
mode = "upsert"
{common}

[[sink]]
name = "warehouse"
kind = "databend"
databend = {{ url = "{databend}/{database}" }}
table = "{{table}}"
mode = "upsert"
{common}

[sink.tables."{prefix}.{schema}.products"]
table = "catalog"

[[sink]]
name = "log"
kind = "parquet"
table = "{log_root}/{{table}}"
{common}
"#,
        kafka = kafka(),
        group = unique("g"),
        membership = group_properties(),
        lake = lake.url,
        databend = need("LAKESINK_TEST_DATABEND"),
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let first: Vec<&Table> = TABLES[..4].iter().collect();

    // 1. The snapshot, then changes in every table: the composite key updated and deleted.
    sql(&format!(
        "INSERT INTO {schema}.customers SELECT i, 'late ' || i, NULL FROM generate_series(41, 70) i;
         UPDATE {schema}.customers SET name = name || ' (moved)', vip = NOT vip WHERE id % 4 = 0;
         DELETE FROM {schema}.customers WHERE id % 9 = 0;
         UPDATE {schema}.products SET price = price + 1 WHERE sku IN ('sku-1', 'sku-3');
         DELETE FROM {schema}.products WHERE sku = 'sku-0';
         UPDATE {schema}.orders SET status = 'paid', total = total + 0.5 WHERE id % 2 = 0;
         DELETE FROM {schema}.orders WHERE id % 11 = 0;
         UPDATE {schema}.order_lines SET qty = qty + 10 WHERE line_no = 2;
         DELETE FROM {schema}.order_lines WHERE line_no = 3 AND order_id % 2 = 0;
         {}",
        lines_sql(&schema, 61, 80)
    ));
    run.converge("changes", &first, false, &mut proc_).await;

    // 2. A table created while lakesink runs (added to the publication, as a DBA would), a
    //    column added to another, and a TRUNCATE with new rows after it.
    let suppliers = &TABLES[4];
    sql(&format!(
        "CREATE TABLE {schema}.suppliers ({});
         ALTER PUBLICATION {} ADD TABLE {schema}.suppliers;",
        suppliers.ddl,
        publication(&connector)
    ));
    sql(&format!(
        "INSERT INTO {schema}.suppliers SELECT 'S' || i, 'supplier ' || i, i % 5 FROM generate_series(1, 25) i;
         UPDATE {schema}.suppliers SET rating = rating + 1 WHERE code IN ('S1', 'S2');
         DELETE FROM {schema}.suppliers WHERE code = 'S3';
         ALTER TABLE {schema}.products ADD COLUMN weight int;
         UPDATE {schema}.products SET weight = length(sku) * 100 WHERE sku <> 'sku-2';
         INSERT INTO {schema}.products VALUES ('sku-9', 'product 9', 99.99, 5);
         TRUNCATE {schema}.order_lines;
         {}
         UPDATE {schema}.order_lines SET qty = 0 WHERE order_id = 90;",
        lines_sql(&schema, 90, 99)
    ));
    let all: Vec<&Table> = TABLES.iter().collect();
    run.converge("new table, column, truncate", &all, true, &mut proc_)
        .await;

    let log = proc_.stop();
    for t in &TABLES {
        let n = assert_change_log(&run, &log_root, t);
        println!(
            "parquet change log of {}: {n} row changes, each once",
            t.name
        );
    }
    assert!(
        log.contains("topic skipped by rule"),
        "Debezium's own topics are skipped by rule:\n{log}"
    );
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR lakesink"))
        .collect();
    assert!(
        errors.is_empty(),
        "no partition stops, nothing fails: {errors:#?}"
    );
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            c if c.is_ascii_alphanumeric() || c == '_' || c == '-' => c.to_string(),
            c => format!("\\{c}"),
        })
        .collect()
}
