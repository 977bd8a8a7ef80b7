//! The feed: the child process that hosts the in-process Kafka (or uses a real broker),
//! produces the workload and times the plain consume loop (the ceiling).

use super::*;

/// What the feed reports once the workload is in the broker.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct FeedReport {
    pub(super) bootstrap: String,
    pub(super) records: u64,
    pub(super) bytes: u64,
    pub(super) baseline_secs: f64,
    /// CPU seconds of the feed process while the plain loop ran: the loop's threads and the
    /// in-process broker serving it.
    pub(super) baseline_cpu_secs: f64,
}

/// What `lakesink bench-feed` produces.
#[derive(Debug)]
pub struct Feed {
    /// A real broker instead of the in-process cluster.
    pub broker: Option<String>,
    pub topics: Vec<String>,
    pub partitions: i32,
    pub records: u64,
    pub format: String,
    pub schema_id: u32,
    pub rate: Option<u64>,
    /// Partition by the order key, as a keyed CDC producer does (upserts): the three changes of
    /// an order land in one partition. Otherwise record `id` goes to partition `id % P`.
    pub keyed: bool,
}

/// `lakesink bench-feed`: the child process. Starts the in-process cluster unless a broker is
/// given, creates the topics, produces the workload (record `id` to topic `id % topics`), times
/// a plain consume loop over it, prints a [`FeedReport`] line, and serves until stdin closes.
pub fn feed(f: Feed) -> anyhow::Result<()> {
    let Feed {
        broker,
        topics,
        partitions,
        records,
        ref format,
        schema_id,
        rate,
        keyed,
    } = f;
    let cluster = match &broker {
        Some(_) => None,
        None => Some(MockCluster::new(1).context("cannot start the in-process Kafka")?),
    };
    let bootstrap = match (&broker, &cluster) {
        (Some(b), _) => b.clone(),
        (None, Some(c)) => {
            for t in &topics {
                c.create_topic(t, partitions, 1)?;
            }
            c.bootstrap_servers()
        }
        (None, None) => unreachable!("a cluster or a broker"),
    };
    if broker.is_some() {
        for t in &topics {
            create_topic(&bootstrap, t, partitions)?;
        }
    }
    let n_topics = topics.len() as i64;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        // Large message sets: the in-process cluster finds a fetch offset by scanning its
        // message sets linearly, so many small ones make the broker the bottleneck.
        .set("linger.ms", if rate.is_some() { "5" } else { "200" })
        .set("batch.size", "4000000")
        .set("batch.num.messages", "100000")
        .set("message.max.bytes", "8000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .create()
        .context("cannot create the bench producer")?;
    let schema = order_schema();
    let schema_id = SchemaId(schema_id);
    let mut stdin = std::io::stdin().lock();
    if rate.is_some() {
        // Latency mode: report now, produce when the pipeline has joined (a `go` line).
        let report = FeedReport {
            bootstrap: bootstrap.clone(),
            records,
            bytes: 0,
            baseline_secs: 0.0,
            baseline_cpu_secs: 0.0,
        };
        println!("{}", serde_json::to_string(&report)?);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdin, &mut line)?;
    }
    let paced_from = Instant::now();
    for id in 0..records as i64 {
        if let Some(rate) = rate {
            let due = paced_from + Duration::from_secs_f64(id as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                producer.poll(due - now);
            }
        }
        let value = payload(format, id, &schema, schema_id);
        let key = Order::generate(id).order_id;
        // Keyed: the three changes of an order go to one topic (one table), as a table's
        // changes do.
        let topic = match keyed {
            true => &topics[((id / 3) % n_topics) as usize],
            false => &topics[(id % n_topics) as usize],
        };
        let p = if keyed {
            // The three changes of an order (`o-{id / 3}`) land in one partition.
            ((id / 3 / n_topics) % partitions as i64) as i32
        } else {
            ((id / n_topics) % partitions as i64) as i32
        };
        crate::app::demo::send(
            &producer,
            BaseRecord::to(topic)
                .partition(p)
                .key(key.as_str())
                .payload(value.as_slice()),
        )?;
        if id % 10_000 == 0 {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("cannot flush the bench producer")?;
    drop(producer);
    if rate.is_some() {
        let mut rest = Vec::new();
        let _ = stdin.read_to_end(&mut rest);
        drop(cluster);
        return Ok(());
    }
    let (elapsed, cpu, bytes) = baseline_consume(&bootstrap, &topics, records)?;
    let report = FeedReport {
        bootstrap,
        records,
        bytes,
        baseline_secs: elapsed.as_secs_f64(),
        baseline_cpu_secs: cpu,
    };
    println!("{}", serde_json::to_string(&report)?);
    // Serve until the parent closes our stdin (or dies).
    let mut rest = Vec::new();
    let _ = stdin.read_to_end(&mut rest);
    drop(cluster);
    Ok(())
}

pub(super) fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("cannot create topic {t}: {e}");
        }
    }
    Ok(())
}

/// The ceiling: a plain consume loop that touches every payload and does nothing else. Returns
/// its time and this process's CPU seconds from the first record, and the payload bytes.
pub(super) fn baseline_consume(
    bootstrap: &str,
    topics: &[String],
    expected: u64,
) -> anyhow::Result<(Duration, f64, u64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{}-baseline", topics[0]))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names)?;
    let mut started = Instant::now();
    let mut cpu_at_start = 0.0;
    let (mut n, mut bytes) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < expected {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m?;
            if n == 0 {
                // Time from the first record: the group join is not throughput.
                started = Instant::now();
                cpu_at_start = process_cpu_precise();
            }
            bytes += m.payload().map_or(0, |p| p.len()) as u64;
            n += 1;
        }
        if Instant::now() > deadline {
            bail!("baseline consumer read only {n} of {expected} records in 10 minutes");
        }
    }
    let cpu = process_cpu_precise() - cpu_at_start;
    Ok((started.elapsed(), cpu, bytes))
}
