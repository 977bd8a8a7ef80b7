//! Databend sink against real services: Apache Kafka, the registry, and the Databend test server
//! (tests/py/databend_server.py: Databend's HTTP protocol over the real embedded Databend
//! engine). What lands is queried back through the engine.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::databend::*;
use common::*;
use serde_json::Value;

fn sink_config(database: &str, table: &str, extra: &str) -> String {
    let base = databend_url();
    format!("kind = \"databend\"\ndatabend = {{ url = \"{base}/{database}\" }}\n{extra}",)
        .replace("table = \"TABLE\"", &format!("table = \"{table}\""))
}

/// Replaces the store URL line of a generated config with a Databend table name.
fn with_table(cfg: String, store: &Store, table: &str) -> String {
    cfg.replace(
        &format!("table = \"{}\"", store.url),
        &format!("table = {}", toml_string(table)),
    )
    .replace(&format!("storage = {}\n", store.toml_options()), "")
}

fn toml_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The order workload's config sinking into Databend table `table` (no partitions, flushes of
/// 100 records).
fn orders_config(topic: &str, group: &str, registry: &str, database: &str, table: &str) -> String {
    let store = Store::local("unused");
    with_table(
        config(
            topic,
            group,
            registry,
            &store,
            &sink_config(database, table, ""),
        ),
        &store,
        table,
    )
    .replace("partition_by = [\"day(ts)\"]\n", "")
    .replace("max_rows = 400", "max_rows = 100")
}

/// Waits until the ledger has every partition at its end.
async fn wait_ledger(
    database: &str,
    sink: &str,
    topic: &str,
    produced: &Produced,
    proc_: &mut Lakesink,
) {
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o) in produced.keys() {
        let e = ends.entry(*p).or_default();
        *e = (*e).max(o + 1);
    }
    let start = Instant::now();
    loop {
        let pos = ledger(database, sink, topic).await;
        if ends.iter().all(|(p, e)| pos.get(p) == Some(e)) {
            return;
        }
        if let Some(status) = proc_.child.try_wait().unwrap() {
            panic!(
                "lakesink exited ({status}); ledger {pos:?} vs ends {ends:?}\n{}",
                proc_.log()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "ledger {pos:?} vs ends {ends:?}\n{}",
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn databend_append_exactly_once_with_a_crash_between_upload_and_commit() {
    let database = unique("lake");
    let topic = unique("orders");
    let partitions = 3;
    let n = 1200;
    create_topic(&topic, partitions).await;
    let (registry_url, client_) = registry().await;
    let id = register_orders(&client_, &topic).await;
    let produced = produce(&topic, id, 0..n, partitions).await;
    let group = unique("g");
    // A table name with a quote, a space and a reserved word: quoted everywhere, never injected.
    let table = "orders \"raw\" select";
    let cfg = orders_config(&topic, &group, &registry_url, &database, table);
    let mut first = Lakesink::start(&cfg, &[("LAKESINK_TEST_CRASHPOINT", "after_stage:3")]);
    first.wait_for_line("CRASHPOINT after_stage", Duration::from_secs(120));
    first.kill9();
    let mut second = Lakesink::start(&cfg, &[("LAKESINK_TEST_CRASHPOINT", "after_commit:2")]);
    second.wait_for_line("CRASHPOINT after_commit", Duration::from_secs(120));
    second.kill9();
    let mut third = Lakesink::start(&cfg, &[]);
    wait_ledger(&database, "orders", &topic, &produced, &mut third).await;
    let log = third.stop();
    assert!(
        !log.contains("databend-test-secret"),
        "the password leaked into the log"
    );
    assert_orders_exactly_once(&database, table, &produced).await;
    let types = rows(
        &database,
        &format!("SELECT name, type FROM system.columns WHERE database = '{database}' AND name IN ('cost', 'ts', 'ship_date')"),
    )
    .await;
    let types: BTreeMap<String, String> = types
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap()))
        .collect();
    assert!(types["cost"].contains("Decimal"), "{types:?}");
    assert!(types["ts"].contains("Timestamp"), "{types:?}");
    assert!(types["ship_date"].contains("Date"), "{types:?}");
}

/// A compatible schema version arrives mid-stream: `ALTER TABLE … ADD COLUMN` runs before the
/// load transaction that first carries the field; earlier rows read null.
#[tokio::test(flavor = "multi_thread")]
async fn databend_gains_a_column_mid_stream() {
    let database = unique("lake");
    let topic = unique("evolve");
    create_topic(&topic, 1).await;
    let (registry_url, client_) = registry().await;
    let (n, v2_from) = (600, 300);
    let produced = produce_evolving(&client_, &topic, 0..n, v2_from).await;
    let table = "orders";
    let cfg = orders_config(&topic, &unique("g"), &registry_url, &database, table);
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_ledger(&database, "orders", &topic, &produced, &mut proc_).await;
    proc_.stop();
    assert_orders_exactly_once(&database, table, &produced).await;
    let got = rows(
        &database,
        &format!("SELECT _kafka_offset, id, coupon FROM \"{database}\".{table}"),
    )
    .await;
    assert_eq!(got.len(), n as usize);
    for r in got {
        let id: i64 = r[1].as_deref().unwrap().parse().unwrap();
        let want = (id >= v2_from).then(|| coupon(id));
        assert_eq!(r[2], want, "coupon of order {id}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn databend_upsert_reaches_the_final_state() {
    let database = unique("lake");
    let topic = unique("dbserver1.inventory.customers");
    create_topic(&topic, 1).await;
    let image = |c: i64, v: &str, tier: Option<String>| {
        let mut row = serde_json::json!({"id": c, "name": format!("customer {c} {v}")});
        if let Some(t) = tier {
            row["tier"] = Value::String(t);
        }
        row
    };
    let mut changes: Vec<Change> = Vec::new();
    for c in 1..=30 {
        changes.push(("c", c, image(c, "v0", None)));
    }
    for c in (2..=30).step_by(2) {
        changes.push(("u", c, image(c, "v1", None)));
    }
    for c in (5..=30).step_by(5) {
        changes.push(("d", c, Value::Null));
    }
    // Later images carry `tier`; the rows that never got one read null.
    for c in (3..=30).step_by(3) {
        if c % 5 != 0 {
            changes.push(("u", c, image(c, "v2", Some(format!("tier{c}")))));
        }
    }
    let (state, sent) = produce_changes(&topic, &changes).await;
    let state: BTreeMap<i64, (String, Option<String>)> = state
        .into_iter()
        .map(|(id, row)| {
            (
                id,
                (
                    row["name"].as_str().unwrap().to_string(),
                    row["tier"].as_str().map(str::to_string),
                ),
            )
        })
        .collect();
    let (registry_url, _c) = registry().await;
    let store = Store::local("unused");
    let group = unique("g");
    let cfg = with_table(
        config_with(
            &topic,
            &group,
            &registry_url,
            &store,
            "[]",
            &sink_config(
                &database,
                "{table}",
                "mode = \"upsert\"\nkey = [\"id\"]\nformat = \"json\"\nschema = { id = \"long\", name = \"string\", tier = \"string\" }",
            ),
        ),
        &store,
        "{table}",
    )
    .replace("max_rows = 400", "max_rows = 13");
    // Plain JSON rows (no envelope) would not carry deletes: use the Debezium decoder.
    let cfg = cfg.replace("format = \"json\"", "format = \"debezium-json\"");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let produced: Produced = (0..sent).map(|o| ((0, o), o)).collect();
    wait_ledger(&database, "orders", &topic, &produced, &mut proc_).await;
    proc_.stop();
    let table = topic.rsplit('.').next().unwrap();
    let got = rows(
        &database,
        &format!("SELECT id, name, tier FROM \"{database}\".\"{table}\" ORDER BY id"),
    )
    .await;
    let got: BTreeMap<i64, (String, Option<String>)> = got
        .into_iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                (r[1].clone().unwrap(), r[2].clone()),
            )
        })
        .collect();
    assert_eq!(got, state);
}
