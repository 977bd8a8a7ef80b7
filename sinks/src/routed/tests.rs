use super::*;
use crate::parquet::{ParquetSink, ParquetSinkConfig};
use crate::store::TableStore;
use crate::testing;

fn parquet_router(root: &std::path::Path, template: &str, writer: &str) -> Routed<ParquetSink> {
    let writer = writer.to_string();
    let template = TableTemplate::parse(&format!("file://{}/{template}", root.display())).unwrap();
    let location = template.as_str().to_string();
    Routed::new(
        template,
        location,
        Box::new(move |_topic: &str, location: &str| {
            Ok(ParquetSink::new(
                TableStore::open(location, Vec::<(String, String)>::new())?,
                ParquetSinkConfig {
                    writer_id: writer.clone(),
                    ..Default::default()
                },
            ))
        }),
    )
}

#[test]
fn templates_take_known_placeholders_only() {
    assert!(TableTemplate::parse("s3://lake/{topic}")
        .unwrap()
        .is_per_topic());
    assert!(!TableTemplate::parse("s3://lake/orders")
        .unwrap()
        .is_per_topic());
    let e = TableTemplate::parse("s3://lake/{schema}/{table}").unwrap_err();
    assert!(e.contains("unknown placeholder `{schema}`"), "{e}");
    let e = TableTemplate::parse("s3://lake/{topic").unwrap_err();
    assert!(e.contains("without a closing"), "{e}");
}

#[test]
fn debezium_topics_give_server_db_and_table() {
    let t =
        TableTemplate::parse("abfss://lake@acct.dfs.core.windows.net/cdc/{server}/{db}/{table}")
            .unwrap();
    assert_eq!(
        t.resolve("shop.public.order_lines").unwrap(),
        "abfss://lake@acct.dfs.core.windows.net/cdc/shop/public/order_lines"
    );
    // A topic prefix with dots is the server; the last two parts are db and table.
    assert_eq!(
        t.resolve("eu.prod.shop.orders").unwrap(),
        "abfss://lake@acct.dfs.core.windows.net/cdc/eu.prod/shop/orders"
    );
    let e = t.resolve("orders").unwrap_err();
    assert!(e.contains("is not named `<server>.<db>.<table>`"), "{e}");
    let t = TableTemplate::parse("file:///lake/{topic}").unwrap();
    assert_eq!(
        t.resolve("shop.public.orders").unwrap(),
        "file:///lake/shop.public.orders"
    );
}

#[test]
fn hostile_topic_names_never_leave_the_root() {
    let t = TableTemplate::parse("file:///lake/{topic}/data").unwrap();
    for hostile in ["..", ".", "a/b", "%2F", "%2E%2E", "a\\b", "", "x y", "é"] {
        let e = t.resolve(hostile).unwrap_err();
        assert!(e.contains("not one plain path segment"), "{hostile}: {e}");
    }
    // `{db}` of `a...b` would be empty: refused as not a Debezium name.
    let t = TableTemplate::parse("file:///lake/{db}/{table}").unwrap();
    assert!(t.resolve("a...b").is_err());
    // The longest topic Kafka allows (249 characters) is one segment.
    let long = "t".repeat(249);
    let t = TableTemplate::parse("file:///lake/{topic}").unwrap();
    assert_eq!(t.resolve(&long).unwrap(), format!("file:///lake/{long}"));
}

#[tokio::test]
async fn each_topic_gets_its_own_table_and_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    testing::all("contract", |i| {
        let r = parquet_router(dir.path(), "{topic}", &format!("w{i}"));
        async move { r }
    })
    .await;
    let router = parquet_router(dir.path(), "{topic}", "w9");
    // Another topic: its own table, its own positions.
    let tp = TopicPartition::new("other", 0);
    assert_eq!(router.recover(&tp).await.unwrap(), None);
    let staged = router.stage(testing::flush(&tp, 0, 3, true)).await.unwrap();
    router.commit(&staged).await.unwrap();
    assert_eq!(router.recover(&tp).await.unwrap(), Some(Offset(3)));
    let tables: Vec<String> = router.tables().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        tables,
        ["other"],
        "a router opens a topic's table on its first call"
    );
    assert!(dir.path().join("other/_lakesink").is_dir());
    assert!(dir.path().join("contract/_lakesink").is_dir());
}

#[tokio::test]
async fn topics_that_differ_only_in_case_do_not_share_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let router = parquet_router(dir.path(), "{topic}", "w0");
    router
        .recover(&TopicPartition::new("Orders", 0))
        .await
        .unwrap();
    let e = router
        .recover(&TopicPartition::new("orders", 0))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("topics `Orders` and `orders` would share this table"),
        "{e}"
    );
    assert!(
        !e.contains('{'),
        "the message names the table, not the template: {e}"
    );
}
