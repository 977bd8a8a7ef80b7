//! The sink contract (`crate::testing`) on a Databend server. Databend has no local mode, so
//! these unit tests use the test server the integration tests use (see
//! [`crate::testing::databend_server`]).

#[tokio::test(flavor = "multi_thread")]
async fn keeps_the_sink_contract() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let database = format!("unit_contract_{}_{nanos}", std::process::id());
    crate::testing::all("contract", |_| {
        let s = crate::testing::databend_writer(&database);
        async move { s }
    })
    .await;
}
