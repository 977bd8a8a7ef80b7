//! A record that cannot be decoded stops the sink with an error naming topic, partition, offset
//! and cause; nothing after it is committed and nothing is skipped silently.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread")]
async fn undecodable_record_stops_the_sink_naming_its_offset() {
    let store = Store::local("orders");
    let topic = unique("poison");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..50, 1).await;
    let poison_offset = produced.keys().map(|(_, o)| *o).max().unwrap() + 1;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let d = producer
        .send(
            FutureRecord::<(), _>::to(&topic)
                .partition(0)
                .payload("{\"not\": \"avro\"}"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(d.offset, poison_offset);
    produce(&topic, id, 50..60, 1).await;

    let cfg = config(&topic, &unique("g"), &registry_url, &store, "");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proc_.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "lakesink kept running:\n{}",
            proc_.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    let log = proc_.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let needle = format!("cannot decode {topic}/0 offset {poison_offset}");
    assert!(log.contains(&needle), "expected `{needle}` in:\n{log}");
    assert!(log.contains("magic byte"), "the cause is named:\n{log}");
    // Nothing at or after the poison record was committed.
    let table = store.read();
    for r in table["rows"].as_array().unwrap() {
        assert!(
            r["o"].as_i64().unwrap() < poison_offset,
            "row after the poison record: {r}"
        );
    }
}

/// Garbage bytes, an unknown schema id, a truncated body, a wrong magic byte and an empty value
/// mixed into a stream: each lands in the dead-letter topic with headers naming the error and
/// its source position, and every good record lands exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn poison_records_go_to_the_dead_letter_topic() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    use std::collections::BTreeMap;

    let store = Store::s3("orders");
    let topic = unique("mixed");
    let dlq = unique("dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let schema = lakesink::app::workload::order_schema();
    let good_body = lakesink::app::workload::Order::generate(7).encode(&schema);
    let framed = schema_registry::wire::frame(id, &good_body);
    let poisons: Vec<(&str, Vec<u8>)> = vec![
        ("wire-format", b"\x7b\"garbage\": true}".to_vec()),
        (
            "unknown-schema",
            schema_registry::wire::frame(schema_registry::SchemaId(987_654), &good_body),
        ),
        ("malformed", framed[..framed.len() / 2].to_vec()),
        ("wire-format", {
            let mut v = framed.clone();
            v[0] = 1;
            v
        }),
        ("wire-format", Vec::new()),
    ];
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut produced = Produced::new();
    let mut poison_at: BTreeMap<i64, &str> = BTreeMap::new();
    let mut next_id = 0;
    for (class, bytes) in &poisons {
        let good = produce(&topic, id, next_id..next_id + 60, 1).await;
        next_id += 60;
        produced.extend(good);
        let d = producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("poison-key")
                    .payload(bytes.as_slice())
                    .headers(OwnedHeaders::new().insert(Header {
                        key: "trace-id",
                        value: Some(class.as_bytes()),
                    })),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        poison_at.insert(d.offset, class);
    }
    produced.extend(produce(&topic, id, next_id..next_id + 60, 1).await);

    let group = unique("g");
    let cfg = config(
        &topic,
        &group,
        &registry_url,
        &store,
        &format!("errors = \"dead-letter\"\ndead_letter_topic = \"{dlq}\""),
    );
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(
        &store,
        &topic,
        produced.len() as u64,
        &mut proc_,
        Duration::from_secs(120),
    )
    .await;
    let log = proc_.stop();
    assert!(log.contains("dead-lettered"), "{log}");
    assert!(
        log.contains("dead_letter_offset="),
        "each dead letter's place is logged: {log}"
    );
    assert_exactly_once(&store.read(), &produced);

    // Read the dead-letter topic back.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[&dlq]).unwrap();
    let mut seen: BTreeMap<i64, (String, Vec<u8>)> = BTreeMap::new();
    let start = Instant::now();
    while seen.len() < poison_at.len() && start.elapsed() < Duration::from_secs(60) {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        let h = m.headers().expect("dead letters carry headers");
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| panic!("header {k} missing"))
        };
        assert_eq!(get("lakesink.source.topic"), topic);
        assert_eq!(get("lakesink.source.partition"), "0");
        assert_eq!(get("lakesink.sink"), "orders");
        assert_eq!(get("lakesink.group"), group);
        assert!(!get("lakesink.error.message").is_empty());
        assert_eq!(m.key(), Some(&b"poison-key"[..]));
        // The record's own headers travel with it.
        assert_eq!(get("trace-id"), get("lakesink.error.class"));
        let offset: i64 = get("lakesink.source.offset").parse().unwrap();
        let prev = seen.insert(
            offset,
            (
                get("lakesink.error.class"),
                m.payload().unwrap_or_default().to_vec(),
            ),
        );
        assert!(prev.is_none(), "offset {offset} dead-lettered twice");
    }
    assert_eq!(seen.len(), poison_at.len(), "dead letters: {seen:?}");
    for ((offset, class), (orig_class, bytes)) in poison_at.iter().zip(&poisons) {
        let (got_class, payload) = &seen[offset];
        assert_eq!(got_class, class, "class of the poison at offset {offset}");
        assert_eq!(got_class, orig_class);
        assert_eq!(
            payload, bytes,
            "the original value is kept at offset {offset}"
        );
    }
}

/// A member dead-letters poison records and is killed before its table commit (the object store
/// is down): the next member reads the range again, finds those dead letters already in the
/// topic and skips them. Each poison record is in the dead-letter topic exactly once, and every
/// good record in the table exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_written_once_across_a_crash_before_the_table_commit() {
    crash_before_the_table_commit(false).await;
}

/// The same crash, with another writer's transaction open in every dead-letter partition below
/// the first member's dead letters (a killed member's, say, not fenced yet): the second member
/// must not stop reading at the last stable offset, where its predecessor's dead letters are
/// still hidden, but wait for that transaction to end.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_written_once_behind_another_writers_open_transaction() {
    crash_before_the_table_commit(true).await;
}

async fn crash_before_the_table_commit(foreign_open_transaction: bool) {
    use common::fault_proxy::FaultProxy;

    let direct = Store::s3("orders");
    let topic = unique("crashy");
    let dlq = unique("dlq");
    create_topic(&topic, 2).await;
    create_topic(&dlq, 3).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let proxy = FaultProxy::start(addr_of(&s3()), 0, 1).await;
    let mut proxied = direct.clone();
    proxied.options.insert("endpoint".into(), proxy.url());
    let group = unique("g");
    let extra = format!("dead_letter_topic = \"{dlq}\"");
    // One flush for everything produced below (within a latency tick of 8 s: see
    // `just_after_latency_tick`), so the first member dead-letters all of it.
    let config = |store: &Store| {
        config(&topic, &group, &registry_url, store, &extra).replace(
            "max_rows = 400, max_latency = \"1s\"",
            "max_rows = 100000, max_latency = \"8s\"",
        )
    };
    // On the epoch grid, so that `just_after_latency_tick` knows the process's ticks.
    let first = Lakesink::start(&config(&proxied), &[("LAKESINK_TICK_PHASE", "0")]);
    let mut first = first;
    for partition in 0..2 {
        // Both partitions recovered: recovery reads the store, which goes down next.
        first.wait_for_line(&format!("{topic}/{partition} "), Duration::from_secs(60));
    }
    proxy.outage(Duration::from_secs(600));
    let foreign = if foreign_open_transaction {
        // After the first member's sessions have read the (empty) tail, before its dead letters.
        first.wait_for_lines("dead-letter session open", 2, Duration::from_secs(60));
        Some(open_foreign_transaction(&dlq, 3).await)
    } else {
        None
    };

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut produced = Produced::new();
    let mut poison = std::collections::BTreeSet::new();
    just_after_latency_tick(Duration::from_secs(8)).await;
    for round in 0..4 {
        produced.extend(produce(&topic, id, round * 50..round * 50 + 50, 2).await);
        for partition in 0..2 {
            let d = producer
                .send(
                    FutureRecord::to(&topic)
                        .partition(partition)
                        .key("poison")
                        .payload(&b"not avro"[..]),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            poison.insert((topic.clone(), d.partition, d.offset));
        }
    }
    let all_there = |dead: &std::collections::BTreeMap<SourcePosition, u32>| {
        poison.iter().all(|k| dead.contains_key(k))
    };
    // The first member's transactions are committed, but with the foreign one open below them
    // only a read_uncommitted reader sees them yet.
    let dead = dead_letters_with(&dlq, "read_uncommitted", all_there).await;
    assert!(
        all_there(&dead),
        "the first member dead-lettered {dead:?}\n{}",
        first.log()
    );
    assert_eq!(
        committed_rows(&direct, &topic).await,
        0,
        "the store is down: nothing may be committed yet"
    );
    first.kill9();

    let mut second = Lakesink::start(&config(&direct), &[]);
    if let Some(foreign) = foreign {
        // Ends the transaction once the second member waits for it (after 30 s regardless: a
        // member that did not wait has written its dead letters again by then, caught below).
        let start = Instant::now();
        while !second
            .log()
            .contains("waiting for an open transaction in the dead-letter partition")
            && start.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        use rdkafka::producer::Producer;
        tokio::task::spawn_blocking(move || foreign.commit_transaction(Duration::from_secs(30)))
            .await
            .unwrap()
            .unwrap();
    }
    wait_rows(
        &direct,
        &topic,
        produced.len() as u64,
        &mut second,
        Duration::from_secs(120),
    )
    .await;
    let log = second.stop();
    assert!(
        log.contains("already in the dead-letter topic"),
        "the second member found the first one's dead letters: {log}"
    );
    assert_exactly_once(&direct.read(), &produced);
    let mut dead = dead_letters(&dlq, all_there).await;
    dead.retain(|(t, _, _), _| *t == topic);
    let keys: std::collections::BTreeSet<_> = dead.keys().cloned().collect();
    assert_eq!(keys, poison, "dead letters vs poison records");
    let twice: Vec<_> = dead.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "dead-lettered more than once: {twice:?}");
}

/// Another writer's transaction, left open with one record in each of `partitions` partitions
/// of `dlq` (headed as a dead letter of a topic no test reads).
async fn open_foreign_transaction(dlq: &str, partitions: i32) -> FutureProducer {
    use rdkafka::producer::Producer;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("transactional.id", unique("foreign-writer"))
        // Open for the whole test: Kafka aborts a transaction older than this.
        .set("transaction.timeout.ms", "300000")
        .create()
        .unwrap();
    let producer = tokio::task::spawn_blocking(move || {
        producer
            .init_transactions(Duration::from_secs(30))
            .map(|()| producer)
    })
    .await
    .unwrap()
    .unwrap();
    producer.begin_transaction().unwrap();
    for partition in 0..partitions {
        let headers = [
            ("lakesink.source.topic", "foreign"),
            ("lakesink.source.partition", "0"),
            ("lakesink.source.offset", &*partition.to_string()),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, v)| {
            h.insert(Header {
                key,
                value: Some(v.as_bytes()),
            })
        });
        producer
            .send(
                FutureRecord::to(dlq)
                    .partition(partition)
                    .key("foreign")
                    .payload(&b"open"[..])
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    producer
}

/// A session fenced by a newer owner's reports the fence (so the worker yields the partition
/// instead of opening a session of its own, which would fence the owner in turn), and writes
/// nothing; the owner's session then writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_fenced_dead_letter_session_says_so_and_writes_nothing() {
    use lakesink::decode::{DecodeError, Record, Rejected};
    use lakesink::kafka::dead_letter::DeadLetters;
    let topic = unique("fenced");
    let dlq = unique("dlq");
    create_topic(&dlq, 2).await;
    let text = format!(
        "[kafka]\nbootstrap_servers = \"{}\"\ngroup_id = \"{}\"\n\n[[sink]]\nname = \"s\"\n\
         topics = [\"{topic}\"]\ntable = \"file:///tmp/unused\"\ndead_letter_topic = \"{dlq}\"\n\
         format = \"json\"\nschema = {{ id = \"long\" }}\n",
        kafka(),
        unique("g")
    );
    let cfg = lakesink::config::Config::from_toml(&text)
        .unwrap()
        .validate()
        .unwrap();
    let dead = DeadLetters::new(&cfg, &dlq, true).unwrap();
    let tp = sinks::TopicPartition::new(topic.as_str(), 0);
    let rejected = |offset: i64| Rejected {
        error: DecodeError {
            tp: tp.clone(),
            offset,
            class: "malformed",
            reason: "test".into(),
            schema_id: None,
            retryable: false,
        },
        record: Record {
            offset,
            timestamp_ms: None,
            key: None,
            payload: Some(bytes::Bytes::from_static(b"poison")),
            headers: Vec::new(),
        },
    };
    let mut old = Some(dead.open("s", &tp).await.unwrap().unwrap());
    let mut owner = Some(dead.open("s", &tp).await.unwrap().unwrap());
    let e = dead
        .write(&mut old, "s", &tp, &[rejected(7)])
        .await
        .expect_err("the older session is fenced");
    assert!(e.fenced, "not reported as a fence: {e}");
    let w = dead
        .write(&mut owner, "s", &tp, &[rejected(7), rejected(9)])
        .await
        .unwrap();
    assert_eq!(
        (w.sent, w.already),
        (2, 0),
        "the fenced session wrote nothing"
    );
    let seen = dead_letters(&dlq, |d| d.len() == 2).await;
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [1, 1],
        "{seen:?}"
    );
}

/// SIGTERM while a new dead-letter session waits for another writer's open transaction (a killed
/// member's, until it is fenced or times out): the process still stops within the drain
/// timeout. Before, the waiting tail read (a blocking task, up to 90 s) held the exit, and the
/// chaos harness saw a member not stop within 60 s.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_dead_letter_wait_stops_within_the_drain_timeout() {
    let store = Store::local("orders");
    let topic = unique("waiting");
    let dlq = unique("dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let foreign = open_foreign_transaction(&dlq, 1).await;
    produce(&topic, id, 0..20, 1).await;
    let cfg = config(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        &format!("dead_letter_topic = \"{dlq}\""),
    )
    .replace("drain_timeout = \"20s\"", "drain_timeout = \"5s\"");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    proc_.wait_for_line(
        "waiting for an open transaction in the dead-letter partition",
        Duration::from_secs(60),
    );
    let start = Instant::now();
    proc_.stop();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "stopping took {took:?} with a 5 s drain timeout"
    );
    drop(foreign);
}

/// One dead-letter session serves every flush of a partition: poison records arriving in three
/// successive flushes are fenced and tail-read once, not once per flush (each opening fences and
/// reads the dead-letter partition, and an opening still under way when a flush committed was
/// cancelled and never reported).
#[tokio::test(flavor = "multi_thread")]
async fn one_dead_letter_session_serves_every_flush() {
    let store = Store::local("orders");
    let topic = unique("rounds");
    let dlq = unique("dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let cfg = config(
        &topic,
        &unique("g"),
        &registry_url,
        &store,
        &format!("errors = \"dead-letter\"\ndead_letter_topic = \"{dlq}\""),
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut proc_ = Lakesink::start(&cfg, &[]);
    let mut produced = Produced::new();
    for round in 0..3 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(0)
                    .key("poison-key")
                    .payload(&b"not avro"[..]),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        produced.extend(produce(&topic, id, round * 10..round * 10 + 10, 1).await);
        // The round's flush commits before the next round is produced.
        wait_rows(
            &store,
            &topic,
            produced.len() as u64,
            &mut proc_,
            Duration::from_secs(60),
        )
        .await;
        proc_.wait_for_lines("dead-lettered", round as usize + 1, Duration::from_secs(30));
    }
    let log = proc_.stop();
    assert_exactly_once(&store.read(), &produced);
    let opened = log.matches("dead-letter session open").count();
    assert_eq!(opened, 1, "sessions opened for 3 flushes:\n{log}");
}
