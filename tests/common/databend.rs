//! Databend test helpers shared by the Databend tests and the chaos harness: a client on the
//! test server (`LAKESINK_TEST_DATABEND`), queries, the ledger position and the order-workload
//! reconciliation.

use std::collections::BTreeMap;

use sinks::databend::client::{Client, ClientConfig as DbConfig, Session};

use super::{need, Produced};

pub fn databend_url() -> String {
    need("LAKESINK_TEST_DATABEND")
}

/// The test server's client settings for `database` (the credentials come out of the URL).
pub fn client_config(database: &str) -> DbConfig {
    sinks::testing::databend_server(database)
}

pub fn client(database: &str) -> Client {
    Client::new(client_config(database)).unwrap()
}

pub async fn rows(database: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    client(database)
        .query(&mut Session::default(), sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .rows
}

/// The ledger's next offset per partition of `topic` for sink `sink` (empty when the ledger
/// does not exist yet or the server is busy).
pub async fn ledger(database: &str, sink: &str, topic: &str) -> BTreeMap<i32, i64> {
    let got = client(database)
        .query(
            &mut Session::default(),
            &format!(
                "SELECT \"partition\", next_offset FROM lakesink_offsets WHERE sink = '{sink}' AND topic = '{topic}'"
            ),
        )
        .await
        .map(|r| r.rows)
        .unwrap_or_default();
    got.iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                r[1].as_deref().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Every produced (partition, offset) exactly once, with exact values.
pub async fn assert_orders_exactly_once(database: &str, table: &str, produced: &Produced) {
    let got = rows(
        database,
        &format!(
            "SELECT _kafka_partition, _kafka_offset, id, order_id, cost, quantity FROM \"{database}\".\"{}\"",
            table.replace('"', "\"\"")
        ),
    )
    .await;
    let mut seen = BTreeMap::new();
    for r in &got {
        let key = (
            r[0].as_deref().unwrap().parse::<i32>().unwrap(),
            r[1].as_deref().unwrap().parse::<i64>().unwrap(),
        );
        assert!(seen.insert(key, r.clone()).is_none(), "duplicate {key:?}");
    }
    let missing: Vec<_> = produced
        .keys()
        .filter(|k| !seen.contains_key(k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} records missing, e.g. {missing:?}",
        produced.len().saturating_sub(seen.len()),
        produced.len()
    );
    assert_eq!(seen.len(), produced.len(), "rows in the table vs produced");
    for (key, id) in produced {
        let r = &seen[key];
        let expected = lakesink::app::workload::Order::generate(*id).expected_json();
        assert_eq!(
            r[2].as_deref().map(|v| v.parse::<i64>().unwrap()),
            expected["id"].as_i64(),
            "{key:?}"
        );
        assert_eq!(r[3].as_deref(), expected["order_id"].as_str(), "{key:?}");
        assert_eq!(
            r[4].as_deref(),
            expected["cost"].as_str(),
            "exact decimal of {key:?}"
        );
        assert_eq!(
            r[5].as_deref().map(|v| v.parse::<i64>().unwrap()),
            expected["quantity"].as_i64(),
            "{key:?}"
        );
    }
}
