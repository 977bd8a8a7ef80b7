//! The sink contract (`crate::testing`) on a Databend server. Databend has no local mode, so
//! these unit tests use the test server the integration tests use, named by
//! `LAKESINK_TEST_DATABEND` (`bash scripts/test.sh` starts it; so does `scripts/services.sh
//! start DIR`, whose `DIR/env` exports the variable).

use std::time::Duration;

use super::client::ClientConfig;
use super::{DatabendSink, DatabendSinkConfig};

fn server(database: &str) -> ClientConfig {
    let url = std::env::var("LAKESINK_TEST_DATABEND").expect(
        "LAKESINK_TEST_DATABEND names the Databend test server: run `bash scripts/test.sh`, or \
         `bash scripts/services.sh start DIR` and `source DIR/env`",
    );
    let mut url = url::Url::parse(&url).expect("LAKESINK_TEST_DATABEND is a URL");
    let user = url.username().to_string();
    let password = url.password().map(str::to_string);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    ClientConfig {
        endpoint: url,
        user,
        password,
        warehouse: None,
        database: database.into(),
        timeout: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keeps_the_sink_contract() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let database = format!("unit_contract_{}_{nanos}", std::process::id());
    crate::testing::all("contract", |i| {
        let s = DatabendSink::new(DatabendSinkConfig {
            client: server(&database),
            // One sink (the ledger's key) written by two writers, as two members would.
            sink: "contract".into(),
            table: "contract".into(),
            upsert: None,
            compression: Default::default(),
        })
        .unwrap_or_else(|e| panic!("writer {i}: {e}"));
        async move { s }
    })
    .await;
}
