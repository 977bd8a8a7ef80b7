//! The sink contract (`sinks::testing`: commit and recover, a retried commit, two writers from
//! one start, an empty flush, a zombie behind the owner) against the real services: Parquet and
//! Delta tables on the S3 (moto), Azure (Azurite) and GCS (fake-gcs-server) servers, and a
//! Databend table on the Databend test server. Each sink's unit tests run the same scenarios on
//! local storage (Databend's, which has no local mode, on the same test server).

mod common;

use common::*;
use sinks::parquet::{ParquetSink, ParquetSinkConfig};
use sinks::testing;

fn stores() -> Vec<Store> {
    vec![
        Store::s3("contract"),
        Store::azure("contract"),
        Store::gcs("contract"),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn parquet_keeps_the_sink_contract_on_every_store() {
    for store in stores() {
        testing::all(&unique("contract"), |i| {
            let s = ParquetSink::new(
                store.table_store(),
                ParquetSinkConfig {
                    writer_id: format!("w{i}"),
                    ..Default::default()
                },
            );
            async move { s }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_keeps_the_sink_contract_on_every_store() {
    for store in stores() {
        let group = unique("g");
        testing::all(&unique("contract"), |_| {
            let s = store.delta_sink(&group);
            async move { s }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn databend_keeps_the_sink_contract() {
    let database = unique("contract").replace('-', "_");
    testing::all(&unique("contract"), |_| {
        let s = testing::databend_writer(&database);
        async move { s }
    })
    .await;
}
