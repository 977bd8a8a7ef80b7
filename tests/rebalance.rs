//! Scale-out: two lakesink processes in one consumer group share a topic's partitions; members
//! join and leave mid-stream (rebalances hand partitions over after a drain), and every record
//! still lands exactly once, under the classic group protocol and KIP-848's.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn members_joining_and_leaving_keep_exactly_once() {
    members_join_and_leave("classic").await;
}

/// The same under KIP-848's consumer group protocol: the broker assigns incrementally.
#[tokio::test(flavor = "multi_thread")]
async fn members_joining_and_leaving_keep_exactly_once_kip848() {
    members_join_and_leave("consumer").await;
}

async fn members_join_and_leave(protocol: &str) {
    let store = Store::s3("orders");
    let topic = unique("scale");
    let partitions = 6;
    create_topic(&topic, partitions).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let cfg = config(&topic, &unique("g"), &registry_url, &store, "")
        .replace(&group_properties(), &group_properties_for(protocol));

    let mut produced = produce(&topic, id, 0..1200, partitions).await;
    let mut a = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 600, &mut a, Duration::from_secs(120)).await;

    // A second member joins: the group rebalances and the partitions are split.
    let mut b = Lakesink::start(&cfg, &[]);
    b.wait_for_line("assigned", Duration::from_secs(60));
    produced.extend(produce(&topic, id, 1200..2400, partitions).await);
    wait_rows(&store, &topic, 1800, &mut b, Duration::from_secs(120)).await;

    // The first member leaves: its partitions are drained, committed and handed to the second.
    let log_a = a.stop();
    assert!(log_a.contains("revoked"), "{log_a}");
    produced.extend(produce(&topic, id, 2400..3000, partitions).await);
    wait_rows(&store, &topic, 3000, &mut b, Duration::from_secs(120)).await;
    let log_b = b.stop();
    assert!(
        log_b.matches("assigned").count() >= 2,
        "the second member should have been assigned twice:\n{log_b}"
    );
    assert_exactly_once(&store.read(), &produced);
}

/// Members of a group that reads many topics of few partitions (a whole database, one table per
/// topic) get an even share of them. librdkafka's default assignor, `range`, assigns topic by
/// topic, so every topic's first partition goes to the same member: with four one-partition
/// topics one member got all four and the other none, and `lakesink bench --members` over
/// 8 tables x 6 partitions ran 4 members at 1.95x one member's speed instead of about 4x.
#[tokio::test(flavor = "multi_thread")]
async fn members_share_many_small_topics_evenly() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let topics: Vec<String> = (0..4).map(|i| unique(&format!("db{i}"))).collect();
    for t in &topics {
        create_topic(t, 1).await;
    }
    let group = unique("g");
    let toml = format!(
        "[kafka]\nbootstrap_servers = \"{kafka}\"\ngroup_id = \"{group}\"\n\
         properties = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\" }}\n\
         [[sink]]\nname = \"t\"\ntopics = [\"{t}\"]\ntable = \"file:///tmp/unused\"\n\
         format = \"json\"\nschema = {{ id = \"long\" }}\n",
        kafka = kafka(),
        t = topics[0],
    );
    let cfg = lakesink::config::Config::from_toml(&toml)
        .unwrap()
        .validate()
        .unwrap();
    let member = || {
        let mut c = rdkafka::ClientConfig::new();
        for (k, v) in &cfg.kafka_properties {
            c.set(k, v.expose());
        }
        c.set("bootstrap.servers", kafka()).set("group.id", &group);
        let consumer: BaseConsumer = c.create().unwrap();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).unwrap();
        consumer
    };
    let (a, b) = (member(), member());
    let counts = || {
        (
            a.assignment().map_or(0, |t| t.count()),
            b.assignment().map_or(0, |t| t.count()),
        )
    };
    let start = std::time::Instant::now();
    let mut stable = 0;
    while stable < 20 && start.elapsed() < Duration::from_secs(60) {
        let _ = a.poll(Duration::from_millis(50));
        let _ = b.poll(Duration::from_millis(50));
        let (x, y) = counts();
        stable = if x + y == topics.len() && x > 0 && y > 0 {
            stable + 1
        } else {
            0
        };
    }
    let (x, y) = counts();
    assert_eq!(
        (x.max(y), x.min(y)),
        (2, 2),
        "four one-partition topics over two members: {x} and {y}"
    );
}
