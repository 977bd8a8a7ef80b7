//! Real Debezium: PostgreSQL with logical decoding, Kafka Connect with Debezium's PostgreSQL
//! connector (JsonConverter with schemas, the default of a Connect deployment, and no schema
//! declared to lakesink), two lakesink sinks on the one topic upserting into a Delta table and a
//! Databend table. SQL on a real table with the common column types (a snapshot of existing
//! rows, inserts, updates, deletes, updates that leave a TOASTed column unchanged, an `ALTER
//! TABLE ... ADD COLUMN`, a `TRUNCATE`) must leave each table equal to `SELECT * FROM` the
//! source table, row by row and value by value, after every phase: read back by python
//! deltalake and by the Databend engine.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::databend::rows as databend_rows;
use common::debezium::{assert_connector_running, sql, start_connector};
use common::*;
use serde_json::{json, Value};

/// A row as text per column, in the canonical forms of `tests/py/canonical_delta.py`.
type Rows = BTreeMap<i64, BTreeMap<String, Option<String>>>;

/// The columns of the source table, in order, with how PostgreSQL prints each canonically.
fn source_columns(with_note: bool) -> Vec<(&'static str, &'static str)> {
    let mut cols = vec![
        ("id", "id::text"),
        ("name", "name"),
        ("credit", "credit::text"),
        ("born", "born::text"),
        // TIME lands as microseconds since midnight (Delta and Databend have no time type).
        (
            "opens",
            "((extract(epoch FROM opens) * 1000000)::bigint)::text",
        ),
        ("seen", "to_char(seen, 'YYYY-MM-DD HH24:MI:SS.US')"),
        (
            "changed",
            "to_char(changed AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')",
        ),
        ("ref", "ref::text"),
        ("doc", "doc::text"),
        ("tags", "array_to_json(tags)::text"),
        ("photo", "encode(photo, 'hex')"),
        ("active", "active::text"),
        ("bio", "bio"),
    ];
    if with_note {
        cols.push(("note", "note"));
    }
    cols
}

fn source_rows(table: &str, with_note: bool) -> Rows {
    let cols = source_columns(with_note);
    let object: Vec<String> = cols.iter().map(|(n, e)| format!("'{n}', {e}")).collect();
    sql(&format!(
        "SELECT json_build_object({}) FROM {table} t ORDER BY id",
        object.join(", ")
    ))
    .lines()
    .map(|l| {
        let v: Value = serde_json::from_str(l).unwrap();
        let row: BTreeMap<String, Option<String>> = cols
            .iter()
            .map(|(n, _)| (n.to_string(), v[n].as_str().map(String::from)))
            .collect();
        (row["id"].as_ref().unwrap().parse().unwrap(), row)
    })
    .collect()
}

fn delta_rows(store: &Store, columns: &[(&str, &str)]) -> Rows {
    let log = std::path::Path::new(store.url.strip_prefix("file://").unwrap()).join("_delta_log");
    if !log.exists() {
        return Rows::new();
    }
    let out = Command::new(python())
        .arg(py_script("canonical_delta.py"))
        .arg(&store.url)
        .output()
        .expect("run canonical_delta.py");
    assert!(
        out.status.success(),
        "canonical_delta.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let schema = &v["schema"];
    assert!(
        schema.get("_unchanged").is_none(),
        "the unchanged-values list is never stored: {schema}"
    );
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let row: BTreeMap<String, Option<String>> = columns
                .iter()
                .map(|(n, _)| (n.to_string(), r[n].as_str().map(String::from)))
                .collect();
            (row["id"].as_ref().unwrap().parse().unwrap(), row)
        })
        .collect()
}

/// The Databend table in the canonical forms: Databend prints timestamps without trailing
/// zero microseconds, binary as upper-case hex and arrays as `['a','b']`.
async fn databend_table_rows(database: &str, table: &str, columns: &[(&str, &str)]) -> Rows {
    let databases = databend_rows(
        "default",
        &format!("SELECT name FROM system.databases WHERE name = '{database}'"),
    )
    .await;
    if databases.is_empty() {
        return Rows::new();
    }
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
    let select: Vec<String> = columns
        .iter()
        .map(|(n, _)| match *n {
            // A column the sink has not added yet.
            n if !present.iter().any(|p| p == n) => "NULL".to_string(),
            "seen" | "changed" => format!("to_string({n})"),
            "photo" => format!("lower(to_hex({n}))"),
            "tags" => format!("to_string(to_variant({n}))"),
            _ => format!("to_string(\"{n}\")"),
        })
        .collect();
    databend_rows(
        database,
        &format!("SELECT {} FROM \"{table}\" ORDER BY id", select.join(", ")),
    )
    .await
    .into_iter()
    .map(|r| {
        let row: BTreeMap<String, Option<String>> = columns
            .iter()
            .zip(r)
            .map(|((n, _), v)| {
                let v = v.map(|v| match *n {
                    "seen" | "changed" if v.len() == 19 => format!("{v}.000000"),
                    "seen" | "changed" => format!("{v:0<26}"),
                    _ => v,
                });
                (n.to_string(), v)
            })
            .collect();
        (row["id"].as_ref().unwrap().parse().unwrap(), row)
    })
    .collect()
}

/// Values of `want` compared with `got`, cell by cell; `Err` names the first difference.
fn compare(what: &str, want: &Rows, got: &Rows) -> Result<usize, String> {
    if want.keys().ne(got.keys()) {
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(k)).collect();
        return Err(format!(
            "{what}: {} rows, the source {}; missing {missing:?}, extra {extra:?}",
            got.len(),
            want.len()
        ));
    }
    let mut values = 0;
    for (id, row) in want {
        for (col, v) in row {
            let g = got[id].get(col).cloned().flatten();
            if *v != g {
                let short =
                    |s: &Option<String>| s.as_ref().map(|s| s.chars().take(80).collect::<String>());
                return Err(format!(
                    "{what}: row {id} column {col}: source {:?}, table {:?}",
                    short(v),
                    short(&g)
                ));
            }
            values += 1;
        }
    }
    Ok(values)
}

struct Tables<'a> {
    connector: String,
    source: String,
    store: &'a Store,
    database: String,
    databend_table: String,
}

impl Tables<'_> {
    /// Waits until both tables equal the source; returns (rows, values compared per table).
    async fn converge(&self, phase: &str, with_note: bool, proc_: &mut Lakesink) -> (usize, usize) {
        assert_connector_running(&self.connector).await;
        let want = source_rows(&self.source, with_note);
        let columns = source_columns(with_note);
        let start = Instant::now();
        loop {
            let delta = compare("delta", &want, &delta_rows(self.store, &columns));
            let databend = compare(
                "databend",
                &want,
                &databend_table_rows(&self.database, &self.databend_table, &columns).await,
            );
            match (&delta, &databend) {
                (Ok(a), Ok(b)) if a == b => return (want.len(), *a),
                _ => {}
            }
            if let Some(s) = proc_.child.try_wait().unwrap() {
                panic!("lakesink exited ({s}):\n{}", proc_.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "{phase}: {delta:?} / {databend:?}\nlog:\n{}",
                proc_.log()
            );
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }
}

/// Values for rows `from..=to` (a TOASTed `bio` for every fifth: stored out of line, without
/// compression, so an UPDATE that leaves it alone does not send it).
fn rows_sql(table: &str, from: i64, to: i64, prefix: &str) -> String {
    format!(
        "INSERT INTO {table} (id, name, credit, born, opens, seen, changed, ref, doc, tags, photo,
                              active, bio)
         SELECT i, '{prefix} ' || i, i * 1.25, DATE '2024-01-01' + i::int,
                TIME '08:00' + i * INTERVAL '61.5 seconds',
                TIMESTAMP '2024-03-01 00:00:00.123456' + i * INTERVAL '1 hour',
                TIMESTAMPTZ '2024-03-01 00:00:00+02' + i * INTERVAL '1 day 0.25 second',
                md5(i::text)::uuid, jsonb_build_object('i', i, 'tags', jsonb_build_array('a', i)),
                ARRAY['t' || i, 'u'], decode(md5(i::text), 'hex'), i % 2 = 0,
                CASE WHEN i % 5 = 0 THEN repeat(md5(i::text), 100) ELSE 'short ' || i END
           FROM generate_series({from}, {to}) i;"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_changes_through_debezium_equal_the_source_table_in_delta_and_databend() {
    let schema = unique("shop").replace('-', "_");
    let prefix = unique("pg");
    let table = format!("{schema}.customers");
    sql(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {table} (id bigint PRIMARY KEY, name text NOT NULL, credit numeric(12,2),
             born date, opens time, seen timestamp, changed timestamptz, ref uuid, doc jsonb,
             tags text[], photo bytea, active boolean NOT NULL DEFAULT true, bio text);
         ALTER TABLE {table} ALTER COLUMN bio SET STORAGE EXTERNAL;
         {}",
        rows_sql(&table, 1, 50, "snapshot")
    ));
    let connector = unique("dbz");
    let _connector = start_connector(&connector, &prefix, &schema, json!({})).await;
    let topic = format!("{prefix}.{schema}.customers");

    let store = Store::local("customers");
    let database = unique("lake").replace('-', "_");
    let group = unique("g");
    let databend = need("LAKESINK_TEST_DATABEND");
    let common = "mode = \"upsert\"\nkey = [\"id\"]\nformat = \"debezium-json\"\n\
                  json_envelope = \"connect\"\nflush = { max_rows = 1000, max_latency = \"1s\" }";
    let cfg = format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "topic.metadata.refresh.interval.ms" = "1000" }}

[[sink]]
name = "lake"
topics = ["{topic}"]
kind = "delta"
table = "{url}"
{common}

[[sink]]
name = "warehouse"
topics = ["{topic}"]
kind = "databend"
databend = {{ url = "{databend}/{database}" }}
table = "customers"
{common}
"#,
        kafka = kafka(),
        membership = group_properties(),
        url = store.url,
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let tables = Tables {
        connector: connector.clone(),
        source: table.clone(),
        store: &store,
        database: database.clone(),
        databend_table: "customers".into(),
    };
    let mut report = Vec::new();

    // 1. The snapshot, then inserts, updates (some leave a TOASTed bio alone), deletes, nulls.
    sql(&format!(
        "{}
         UPDATE {table} SET name = name || ' (updated)', credit = credit + 1 WHERE id % 3 = 0;
         DELETE FROM {table} WHERE id % 7 = 0;
         UPDATE {table} SET active = NOT active WHERE id BETWEEN 10 AND 20;
         UPDATE {table} SET credit = NULL, born = NULL, opens = NULL, seen = NULL,
             changed = NULL, ref = NULL, doc = NULL, tags = NULL, photo = NULL
           WHERE id % 11 = 0;",
        rows_sql(&table, 51, 120, "new")
    ));
    report.push((
        "changes",
        tables.converge("changes", false, &mut proc_).await,
    ));

    // 2. Updates that leave every TOASTed bio alone, now stored in the tables; a new column.
    sql(&format!(
        "UPDATE {table} SET name = name || ' again' WHERE id % 5 = 0;
         ALTER TABLE {table} ADD COLUMN note text;
         UPDATE {table} SET note = 'noted ' || id WHERE id % 4 = 0;
         {}",
        rows_sql(&table, 200, 210, "late")
    ));
    report.push((
        "toast+alter",
        tables.converge("toast+alter", true, &mut proc_).await,
    ));

    // 3. TRUNCATE, then new rows and an update of some of them.
    sql(&format!(
        "TRUNCATE {table};
         {}
         UPDATE {table} SET name = name || '!', note = 'after truncate' WHERE id % 10 = 0;",
        rows_sql(&table, 300, 330, "fresh")
    ));
    report.push((
        "truncate",
        tables.converge("truncate", true, &mut proc_).await,
    ));

    // Debezium's transaction block is kept as columns.
    let out = Command::new(python())
        .arg(py_script("canonical_delta.py"))
        .arg(&store.url)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for col in [
        "_op",
        "_transaction_id",
        "_transaction_total_order",
        "_source_lsn",
    ] {
        assert!(v["schema"].get(col).is_some(), "no {col}: {}", v["schema"]);
    }
    let log = proc_.stop();
    assert!(
        !log.contains("__debezium_unavailable_value"),
        "the marker never reaches a log line or a table"
    );
    for (phase, (rows, values)) in report {
        println!(
            "debezium {phase}: {rows} rows and {values} values equal the source table in Delta \
             and in Databend"
        );
    }
}
