//! Where a partition resumes: always the table's own position, whatever happened to the group,
//! the log or the table in between (the exactly-once review's F4 and F5).

mod common;

use common::*;

/// `lakesink status --json` for `cfg`: one object per (sink, partition).
fn status_of(cfg: &str) -> Vec<serde_json::Value> {
    let path = scratch("status").join("lakesink.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = lakesink_cli(
        &["status", "--json", "--config", path.to_str().unwrap()],
        &[],
    );
    serde_json::from_str(&out).unwrap()
}

/// F5: the Delta commit identity does not contain the consumer group. A run under group
/// `blue`, then one under group `green` (a rename, or a blue/green deployment) over the same
/// topic and table: every record once, not twice.
#[tokio::test(flavor = "multi_thread")]
async fn renaming_the_group_reingests_nothing() {
    let topic = unique("rename");
    create_topic(&topic, 3).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..600, 3).await;
    let delta = Store::local("orders_delta");
    for group in ["blue", "green"] {
        let cfg = config(
            &topic,
            &unique(group),
            &registry_url,
            &delta,
            "kind = \"delta\"",
        );
        catch_up(&cfg, &[]);
    }
    assert_exactly_once(&delta.read_delta(&[]), &produced);
}

fn offsets(store: &Store) -> Vec<(i32, i64)> {
    let mut v: Vec<(i32, i64)> = store.read()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["p"].as_i64().unwrap() as i32, r["o"].as_i64().unwrap()))
        .collect();
    v.sort_unstable();
    v
}

/// F4: the topic is deleted and created again while the table is at position 1,000; the new
/// topic holds 300 records. Skipping them (or reading them as if they followed the old ones)
/// would lose or misplace them silently: the partition stops, the run fails and says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_topic_stops_its_partition_instead_of_skipping() {
    let topic = unique("recreated");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..1000, 1).await;
    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    catch_up(&cfg, &[]);
    assert_eq!(committed_rows(&store, &topic).await, 1000);

    recreate_topic(&topic, 1).await;
    produce(&topic, id, 1000..1300, 1).await;
    let (status, log) = catch_up_status(&cfg, &[]);
    assert!(!status.success(), "the run must fail:\n{log}");
    // The topic id (KIP-516) tells first; without ids, the position beyond the log's end.
    assert!(
        log.contains("holds positions of the earlier topic") && log.contains("quarantined"),
        "the log names the cause:\n{log}"
    );
    assert_eq!(
        committed_rows(&store, &topic).await,
        1000,
        "nothing written"
    );
    // `status` says so before any member is asked: the position is beyond the log's end.
    let rows = status_of(&cfg);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["committed"], 1000, "{rows:?}");
    assert_eq!(rows[0]["end"], 300, "{rows:?}");
    assert!(
        rows[0]["quarantined"]
            .as_str()
            .is_some_and(|q| q.contains("beyond the end of its log (300)")),
        "{rows:?}"
    );
}

/// F4, the case the log's end cannot tell: the topic is deleted and created again, and the new
/// topic already holds more records (900) than the tables' position (600) when lakesink next
/// reads it. Resuming at 600 would skip the new topic's first 600 records. Each table (Parquet,
/// Delta, Databend) recorded the topic's id (KIP-516) before its first commit: the new id stops
/// the partition for every sink, and pointing the sinks at new tables (the documented reset)
/// reads the new topic whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_recreated_topic_with_more_records_is_recognised_by_its_id() {
    use common::databend::{databend_url, rows};
    let topic = unique("recreated-id");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..600, 1).await;
    let three_sinks = |parquet: &Store, delta: &Store, database: &str| {
        let flush = "flush = { max_rows = 400, max_latency = \"1s\" }";
        let extra = format!(
            "\n[[sink]]\nname = \"orders_delta\"\ntopics = [\"{topic}\"]\nkind = \"delta\"\n\
             table = \"{}\"\nstorage = {}\npartition_by = [\"day(ts)\"]\n{flush}\n\
             \n[[sink]]\nname = \"orders_databend\"\ntopics = [\"{topic}\"]\nkind = \"databend\"\n\
             databend = {{ url = \"{}/{database}\" }}\ntable = \"orders\"\n{flush}\n",
            delta.url,
            delta.toml_options(),
            databend_url(),
        );
        config(&topic, &unique("g"), &registry_url, parquet, &extra)
    };
    let counts = |parquet: Store, delta: Store, database: String| {
        let topic = topic.clone();
        async move {
            let p = committed_rows(&parquet, &topic).await;
            let d = delta.read_delta(&[])["rows"].as_array().unwrap().len() as u64;
            let b = rows(&database, "SELECT COUNT(*) FROM orders").await[0][0]
                .clone()
                .unwrap()
                .parse::<u64>()
                .unwrap();
            (p, d, b)
        }
    };
    let (parquet, delta, database) = (
        Store::local("orders"),
        Store::local("orders_delta"),
        unique("db").replace('-', "_"),
    );
    catch_up(&three_sinks(&parquet, &delta, &database), &[]);
    assert_eq!(
        counts(parquet.clone(), delta.clone(), database.clone()).await,
        (600, 600, 600)
    );

    recreate_topic(&topic, 1).await;
    let produced = produce(&topic, id, 600..1500, 1).await;
    let (status, log) = catch_up_status(&three_sinks(&parquet, &delta, &database), &[]);
    assert!(!status.success(), "the run must fail:\n{log}");
    for sink in ["orders", "orders_delta", "orders_databend"] {
        assert!(
            log.contains(&format!(
                "of sink `{sink}` holds positions of the earlier topic"
            )),
            "the log names sink {sink} and the cause:\n{log}"
        );
    }
    assert_eq!(
        counts(parquet.clone(), delta.clone(), database.clone()).await,
        (600, 600, 600),
        "nothing written"
    );

    // The documented reset: new tables read the new topic from its start, once.
    let (parquet, delta, database) = (
        Store::local("orders_new"),
        Store::local("orders_delta_new"),
        unique("db").replace('-', "_"),
    );
    catch_up(&three_sinks(&parquet, &delta, &database), &[]);
    assert_exactly_once(&parquet.read(), &produced);
    assert_exactly_once(&delta.read_delta(&[]), &produced);
    assert_eq!(counts(parquet, delta, database).await, (900, 900, 900));
}

/// F14: a table that does not answer when its partitions are assigned (its S3 store refusing
/// every connection for a minute) leaves those partitions waiting, paused, while the member
/// stays in the group; before, the process exited. Once the store answers they are read, every
/// record once.
#[tokio::test(flavor = "multi_thread")]
async fn a_table_unreachable_at_assignment_leaves_its_partitions_waiting() {
    use common::fault_proxy::FaultProxy;
    let topic = unique("unready");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..400, 2).await;
    let direct = Store::s3("orders");
    let proxy = FaultProxy::start(addr_of(direct.endpoint.as_deref().unwrap()), 0, 7).await;
    let mut proxied = direct.clone();
    proxied.options.insert("endpoint".into(), proxy.url());
    proxy.outage(std::time::Duration::from_secs(60));
    let cfg = config(&topic, &unique("g"), &registry_url, &proxied, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    proc_.wait_for_line("the partition waits", std::time::Duration::from_secs(90));
    assert!(
        proc_.child.try_wait().unwrap().is_none(),
        "the process must not exit:\n{}",
        proc_.log()
    );
    proc_.wait_for_line("answer again", std::time::Duration::from_secs(90));
    wait_rows(
        &direct,
        &topic,
        400,
        &mut proc_,
        std::time::Duration::from_secs(60),
    )
    .await;
    proc_.stop();
    assert_exactly_once(&direct.read(), &produced);
}

/// F4: retention deleted records the table has not read (here with `auto.offset.reset =
/// "latest"`, which before jumped to the end): the rest is read, the loss logged.
#[tokio::test(flavor = "multi_thread")]
async fn records_lost_to_retention_are_logged_and_the_rest_is_read() {
    let topic = unique("retention");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..1000, 1).await;
    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    catch_up(&cfg, &[]);
    produce(&topic, id, 1000..2000, 1).await;
    delete_records(&topic, 0, 1500).await;
    // `latest` only says where a sink with no position starts; this table has one.
    let latest = cfg.replace(
        "\"topic.metadata.refresh.interval.ms\" = \"1000\"",
        "\"topic.metadata.refresh.interval.ms\" = \"1000\", \"auto.offset.reset\" = \"latest\"",
    );
    assert!(latest.contains("latest"));
    let log = catch_up(&latest, &[]);
    assert!(
        log.contains("records 1000..1500") && log.contains("deleted by the topic's retention"),
        "the loss is logged:\n{log}"
    );
    let expected: Vec<(i32, i64)> = (0..1000).chain(1500..2000).map(|o| (0, o)).collect();
    assert_eq!(offsets(&store), expected);
}

/// F4: a table deleted by hand while lakesink was stopped is rebuilt from the log, not resumed
/// from the group's committed offsets (which are for lag dashboards).
#[tokio::test(flavor = "multi_thread")]
async fn a_table_deleted_by_hand_is_rebuilt_from_the_log() {
    let topic = unique("deleted");
    create_topic(&topic, 3).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..600, 3).await;
    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    catch_up(&cfg, &[]);
    let dir = store.url.strip_prefix("file://").unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    catch_up(&cfg, &[]);
    assert_exactly_once(&store.read(), &produced);
}

/// A running lakesink whose Parquet table holds records 0..1000 of a new one-partition topic;
/// then the topic is deleted, created again and given the order lines `then`.
async fn recreated_under_a_running_sink(
    prefix: &str,
    then: std::ops::Range<i64>,
) -> (String, Store, Lakesink) {
    let topic = unique(prefix);
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..1000, 1).await;
    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        1000,
        &mut proc_,
        std::time::Duration::from_secs(60),
    )
    .await;
    recreate_topic(&topic, 1).await;
    produce(&topic, id, then, 1).await;
    (topic, store, proc_)
}

/// F4 while running: the topic is recreated under a running lakesink. The partition stops (the
/// process goes on, for its other partitions) instead of reading the new records as if they
/// followed the old ones, or skipping them.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_recreated_under_a_running_sink_stops_its_partition() {
    let (topic, store, proc_) = recreated_under_a_running_sink("recreated-live", 1000..1300).await;
    // Two detections race, both stopping the partition: the new topic's end is behind the
    // table's position, or the broker's topic id is not the one the table recorded (whichever
    // the member sees first after the recreation).
    let started = std::time::Instant::now();
    let log = loop {
        let log = proc_.log();
        if log.contains("beyond the end of its log")
            || log.contains("was deleted and created again")
        {
            break log;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "the recreated topic's partition did not stop within 90 s:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if log.contains("beyond the end of its log") {
        assert!(log.contains("position 1000"), "{log}");
    }
    proc_.stop();
    assert_eq!(
        committed_rows(&store, &topic).await,
        1000,
        "nothing written"
    );
}

/// F4 while running, with more records than the position: the topic is recreated under a
/// running lakesink and the new topic passes the table's position (1,500 records, position
/// 1,000) before lakesink reads it again. The log's end cannot tell; the topic id does.
#[tokio::test(flavor = "multi_thread")]
async fn a_topic_recreated_under_a_running_sink_with_more_records_stops_its_partition() {
    let (topic, store, mut proc_) =
        recreated_under_a_running_sink("recreated-live-id", 1000..2500).await;
    proc_.wait_for_line(
        "holds positions of the earlier topic",
        std::time::Duration::from_secs(90),
    );
    let log = proc_.stop();
    assert_eq!(
        committed_rows(&store, &topic).await,
        1000,
        "nothing written:\n{log}"
    );
}

/// F7: a commit marker deleted by hand leaves a hole in partition 0's chain. That partition
/// stops with the table's error (before: a warning, and the hole's records were skipped for
/// good); partition 1 goes on, in the same process.
#[tokio::test(flavor = "multi_thread")]
async fn a_hole_in_one_partitions_chain_stops_only_that_partition() {
    use sinks::Sink;
    let topic = unique("hole");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..400, 2).await;
    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "")
        .replace("max_rows = 400", "max_rows = 50");
    catch_up(&cfg, &[]);
    let dir = std::path::PathBuf::from(store.url.strip_prefix("file://").unwrap());
    let commits = dir.join("_lakesink/commits").join(&topic).join("0");
    let mut markers: Vec<_> = std::fs::read_dir(&commits)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    markers.sort();
    assert!(markers.len() >= 3, "{markers:?}");
    std::fs::remove_file(&markers[1]).unwrap();
    let _ = std::fs::remove_file(
        dir.join("_lakesink/checkpoints")
            .join(&topic)
            .join("0.json"),
    );

    produce(&topic, id, 400..800, 2).await;
    let mut proc_ = Lakesink::start(&cfg, &[]);
    proc_.wait_for_line("are in no commit", std::time::Duration::from_secs(60));
    let reader = sinks::parquet::ParquetSink::new(store.table_store(), Default::default());
    let p1 = sinks::TopicPartition::new(topic.as_str(), 1);
    let start = std::time::Instant::now();
    while reader.committed(&p1).await.unwrap() != Some(sinks::Offset(400)) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "partition 1 stopped too:\n{}",
            proc_.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let log = proc_.stop();
    assert!(
        log.contains("quarantined") || log.contains("does not consume"),
        "{log}"
    );
    let p0 = sinks::TopicPartition::new(topic.as_str(), 0);
    assert!(
        reader.committed(&p0).await.is_err(),
        "partition 0 still has its hole"
    );
    // `status`: partition 0 quarantined with the table's reason, partition 1 committed to
    // its end, with the time of its last commit.
    let rows = status_of(&cfg);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0]["quarantined"]
            .as_str()
            .is_some_and(|q| q.contains("are in no commit")),
        "{rows:?}"
    );
    assert_eq!(rows[1]["committed"], 400, "{rows:?}");
    assert_eq!(rows[1]["lag"], 0, "{rows:?}");
    assert!(rows[1].get("quarantined").is_none(), "{rows:?}");
    let at = rows[1]["last_commit"].as_str().expect("a last commit time");
    let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    let age = chrono::Utc::now().signed_duration_since(at);
    assert!(
        (0..120).contains(&age.num_seconds()),
        "last commit {at} is {age} old"
    );
}

/// A move from Kafka Connect (`kafka.start_from_group`): a table with no position starts where
/// the connector's consumer group committed, a partition the group never committed where
/// `auto.offset.reset` says, and from its first commit on the table's own position rules.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_table_starts_where_the_connectors_group_committed() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let topic = unique("from_connect");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..400, 2).await;
    // The connector's group committed partition 0 up to offset 120, nothing for partition 1.
    let connect_group = unique("connect-s3-sink");
    let connector: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", &connect_group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(120))
        .unwrap();
    connector.commit(&tpl, CommitMode::Sync).unwrap();
    drop(connector);

    let store = Store::local("orders");
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "").replace(
        "[schema_registry]",
        &format!("start_from_group = \"{connect_group}\"\n\n[schema_registry]"),
    );
    let log = catch_up(&cfg, &[]);
    assert!(
        log.contains(&format!("where group `{connect_group}` committed")),
        "{log}"
    );
    let mut expected: Vec<(i32, i64)> = produced
        .keys()
        .copied()
        .filter(|(p, o)| *p == 1 || *o >= 120)
        .collect();
    expected.sort_unstable();
    assert_eq!(offsets(&store), expected);
    // The table's position rules from now on: a second run reads nothing again.
    produce(&topic, id, 400..410, 2).await;
    catch_up(&cfg, &[]);
    let again = offsets(&store);
    assert_eq!(again.len(), expected.len() + 10, "only the new records");
}
