//! The schema registry down while records wait: the worker retries, its partition is paused
//! rather than the poll thread blocked (the member stays in its group past
//! `max.poll.interval.ms`), SIGTERM stops the process within the drain timeout, and after the
//! registry is back every record lands exactly once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use schema_registry::{RegistryClient, RegistryConfig};

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_outage_pauses_the_partition_and_sigterm_is_heard() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let url = format!("http://{addr}");
    let dir = scratch("registry-outage");
    let (_, server) = schema_registry::server::spawn(addr, Some(dir.clone()))
        .await
        .unwrap();
    let client = RegistryClient::new(RegistryConfig::new(&url)).unwrap();
    let topic = unique("outage");
    create_topic(&topic, 1).await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..3000, 1).await;
    // The registry goes down before lakesink has read a schema.
    server.abort();
    let _ = server.await;

    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &url, &store, "")
        .replace(
            "drain_timeout = \"20s\"",
            "drain_timeout = \"5s\"\nqueue_records = 256",
        )
        .replace(
            "\"topic.metadata.refresh.interval.ms\" = \"1000\"",
            "\"topic.metadata.refresh.interval.ms\" = \"1000\", \"max.poll.interval.ms\" = \"7000\"",
        );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    proc_.wait_for_line("is paused until they do", Duration::from_secs(60));
    // Longer than max.poll.interval.ms: a blocked poll thread would have left the group.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let log = proc_.log();
    assert!(
        !log.contains("maximum poll interval") && !log.contains("revoked"),
        "the member left its group while the registry was down:\n{log}"
    );
    assert!(log.contains("retrying"), "{log}");
    // SIGTERM is heard while the worker is still retrying: out within the drain timeout.
    let stopping = Instant::now();
    let log = proc_.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "took {:?} to stop:\n{log}",
        stopping.elapsed()
    );
    assert_eq!(committed_rows(&store, &topic).await, 0);

    // The registry is back: every record lands, once.
    let (_, _server) = schema_registry::server::spawn(addr, Some(dir))
        .await
        .unwrap();
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 3000, &mut proc_, Duration::from_secs(120)).await;
    proc_.stop();
    assert_exactly_once(&store.read(), &produced);
}
