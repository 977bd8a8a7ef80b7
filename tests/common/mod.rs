//! Shared helpers for the integration tests: service endpoints (started by `scripts/test.sh`),
//! unique names, topic creation, producing the order workload, running the `lakesink` binary,
//! and reading tables back with the independent Python readers.
// Helpers shared by the test binaries, each of which uses some of them.
#![allow(unreachable_pub)]
#![allow(dead_code)]

pub mod databend;
pub mod debezium;
pub mod fault_proxy;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use schema_registry::{wire, RegistryClient, RegistryConfig, SchemaId};
use serde_json::Value;

use lakesink::app::workload::{order_schema, Order, ORDER_SCHEMA};

pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

pub fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the integration tests through scripts/test.sh, which starts the services")
    })
}

pub fn kafka() -> String {
    need("LAKESINK_TEST_KAFKA")
}
pub fn s3() -> String {
    need("LAKESINK_TEST_S3")
}
pub fn azure() -> String {
    need("LAKESINK_TEST_AZURE")
}
pub fn python() -> String {
    need("LAKESINK_TEST_PYTHON")
}
/// fake-gcs-server's base URL.
pub fn gcs() -> String {
    need("LAKESINK_TEST_GCS")
}
/// A service-account file for fake-gcs-server (its base URL, OAuth off), as object_store reads it.
pub fn gcs_account() -> String {
    need("LAKESINK_TEST_GCS_ACCOUNT")
}

/// The consumer group protocol the tests use: `classic` (default) or KIP-848's `consumer`,
/// from `LAKESINK_TEST_GROUP_PROTOCOL`.
pub fn group_protocol() -> String {
    std::env::var("LAKESINK_TEST_GROUP_PROTOCOL").unwrap_or_else(|_| "classic".into())
}

/// `[kafka] properties` entries for fast group membership under `protocol`: classic takes
/// the session timeout from the client; KIP-848's protocol takes it from the broker
/// (`group.consumer.session.timeout.ms`, 6 s in scripts/kafka.sh) and refuses the client keys.
pub fn group_properties_for(protocol: &str) -> String {
    match protocol {
        "consumer" => r#""group.protocol" = "consumer""#.to_string(),
        _ => r#""session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500""#.to_string(),
    }
}

/// [`group_properties_for`] the protocol of this run ([`group_protocol`]).
pub fn group_properties() -> String {
    group_properties_for(&group_protocol())
}

/// Runs `scripts/kafka.sh ACTION` on the test broker (`kill`, `restart`): the broker crash of
/// the chaos harness. `restart` returns when the broker serves again.
pub fn kafka_broker(action: &str) {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/kafka.sh"))
        .arg(action)
        .arg(need("LAKESINK_TEST_KAFKA_DIR"))
        .output()
        .expect("run scripts/kafka.sh");
    assert!(
        out.status.success(),
        "kafka.sh {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the broker says about transactions (Kafka's kafka-transactions tool: `list`,
/// `describe-producers --topic T --partition P`, `find-hanging --broker-id 1`): for failure
/// reports.
#[allow(dead_code)]
pub fn kafka_transactions(args: &[&str]) -> String {
    match Command::new("bash")
        .arg(repo_root().join("scripts/kafka.sh"))
        .arg("transactions")
        .arg(need("LAKESINK_TEST_KAFKA_DIR"))
        .args(args)
        .output()
    {
        Ok(out) => format!(
            "kafka-transactions {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.contains("Reconfiguration failed"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        Err(e) => format!("kafka-transactions {}: {e}", args.join(" ")),
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub fn scratch(name: &str) -> PathBuf {
    let base = std::env::var("LAKESINK_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let d = base.join(unique(name));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Where a test table lives and how to reach it.
#[derive(Debug, Clone)]
pub struct Store {
    pub url: String,
    pub options: BTreeMap<String, String>,
    /// Endpoint for the Python readers.
    pub endpoint: Option<String>,
}

impl Store {
    pub fn s3(table: &str) -> Store {
        let bucket = unique("lake");
        let url = format!("s3://{bucket}/{table}");
        create_container(&url, &s3());
        Store {
            url,
            options: [
                ("endpoint", s3()),
                ("region", "us-east-1".into()),
                ("access_key_id", "test".into()),
                ("secret_access_key", "test".into()),
                ("allow_http", "true".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            endpoint: Some(s3()),
        }
    }

    pub fn azure(table: &str) -> Store {
        let container = unique("lake");
        let url = format!("az://{container}/{table}");
        create_container(&url, &azure());
        Store {
            url,
            options: [
                ("account_name", "devstoreaccount1".to_string()),
                ("access_key", AZURITE_KEY.into()),
                ("endpoint", azure()),
                ("allow_http", "true".into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            endpoint: Some(azure()),
        }
    }

    /// A `gs://` table on fake-gcs-server.
    pub fn gcs(table: &str) -> Store {
        let bucket = unique("lake");
        let url = format!("gs://{bucket}/{table}");
        create_container(&url, &gcs());
        Store {
            url,
            options: [("service_account_path".to_string(), gcs_account())].into(),
            endpoint: Some(gcs()),
        }
    }

    pub fn local(table: &str) -> Store {
        let dir = scratch("local").join(table);
        Store {
            url: format!("file://{}", dir.display()),
            options: BTreeMap::new(),
            endpoint: None,
        }
    }

    pub fn table_store(&self) -> sinks::store::TableStore {
        sinks::store::TableStore::open(&self.url, self.options.clone()).unwrap()
    }

    pub fn toml_options(&self) -> String {
        let parts: Vec<String> = self
            .options
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        format!("{{ {} }}", parts.join(", "))
    }

    /// Dumps a local table with pyarrow (see tests/py/dump_table.py): column types, column
    /// order and rows with canonical values.
    pub fn dump(&self) -> Value {
        let out = Command::new(python())
            .arg(py_script("dump_table.py"))
            .arg(self.url.strip_prefix("file://").expect("a local table"))
            .output()
            .expect("run dump_table.py");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("dump_table.py prints JSON")
    }

    /// Reads the table with pyarrow and DuckDB (see tests/py/read_table.py).
    pub fn read(&self) -> Value {
        let mut cmd = Command::new(python());
        cmd.arg(py_script("read_table.py")).arg(&self.url);
        if self.url.starts_with("s3://") {
            cmd.arg("--s3-endpoint")
                .arg(self.endpoint.as_ref().unwrap());
        }
        if self.url.starts_with("az://") {
            cmd.arg("--azure-endpoint")
                .arg(self.endpoint.as_ref().unwrap());
        }
        if self.url.starts_with("gs://") {
            cmd.arg("--gcs-endpoint")
                .arg(self.endpoint.as_ref().unwrap());
        }
        let out = cmd.output().expect("run read_table.py");
        assert!(
            out.status.success(),
            "read_table.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("read_table.py prints JSON")
    }
}

impl Store {
    /// An `abfss://` URL on Azurite through object_store's emulator mode (the process needs
    /// `AZURITE_BLOB_STORAGE_URL`, see [`Store::env`]).
    pub fn abfss(table: &str) -> Store {
        let container = unique("lake");
        create_container(&format!("az://{container}/{table}"), &azure());
        Store {
            url: format!("abfss://{container}@devstoreaccount1.dfs.core.windows.net/{table}"),
            options: [("use_emulator".to_string(), "true".to_string())].into(),
            endpoint: Some(azure()),
        }
    }

    /// Environment the lakesink process needs for this store.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        if self.url.starts_with("abfss://") {
            let base = azure();
            let base = base.trim_end_matches("/devstoreaccount1").to_string();
            vec![("AZURITE_BLOB_STORAGE_URL", base)]
        } else {
            Vec::new()
        }
    }

    /// Reads a Delta table with python `deltalake` and DuckDB (see tests/py/read_delta.py).
    pub fn read_delta(&self, app_ids: &[String]) -> Value {
        let mut cmd = Command::new(python());
        cmd.arg(py_script("read_delta.py")).arg(&self.url);
        if self.url.starts_with("s3://") {
            cmd.arg("--s3-endpoint")
                .arg(self.endpoint.as_ref().unwrap());
        }
        if self.url.starts_with("az://") {
            cmd.arg("--azure-endpoint")
                .arg(self.endpoint.as_ref().unwrap());
        }
        if self.url.starts_with("abfss://") {
            cmd.arg("--azurite-url").arg(&self.env()[0].1);
        }
        if self.url.starts_with("gs://") {
            cmd.arg("--gcs-account").arg(gcs_account());
        }
        for a in app_ids {
            cmd.arg("--app-id").arg(a);
        }
        let out = cmd.output().expect("run read_delta.py");
        assert!(
            out.status.success(),
            "read_delta.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("read_delta.py prints JSON")
    }

    /// A Delta sink on this store, for reading committed positions from the test.
    pub fn delta_sink(&self, group: &str) -> sinks::delta::DeltaSink {
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
        sinks::delta::DeltaSink::new(
            &self.url,
            self.options.clone(),
            sinks::delta::DeltaSinkConfig {
                legacy_app_id_prefix: Some(format!("lakesink/{group}")),
                ..Default::default()
            },
        )
        .unwrap()
    }
}

/// Waits until a Delta table's txn positions reach the end of everything `produced`.
pub async fn wait_delta(
    sink: &sinks::delta::DeltaSink,
    topic: &str,
    produced: &Produced,
    proc_: &mut Lakesink,
    timeout: Duration,
) {
    use sinks::Sink;
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o) in produced.keys() {
        let e = ends.entry(*p).or_default();
        *e = (*e).max(o + 1);
    }
    let start = Instant::now();
    loop {
        let mut behind = Vec::new();
        for (p, end) in &ends {
            let tp = sinks::TopicPartition::new(topic, *p);
            let pos = sink.committed(&tp).await.ok().flatten().map_or(0, |o| o.0);
            if pos < *end {
                behind.push((*p, pos, *end));
            }
        }
        if behind.is_empty() {
            return;
        }
        if let Some(status) = proc_.child.try_wait().unwrap() {
            panic!(
                "lakesink exited ({status}); behind: {behind:?}\n{}",
                proc_.log()
            );
        }
        assert!(
            start.elapsed() < timeout,
            "partitions behind after {timeout:?} (p, committed, end): {behind:?}\n{}",
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The checkout the tests run from. Read at run time: with a target directory shared between
/// checkouts, cargo may reuse a test binary whose compile-time path names another checkout.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

pub fn py_script(name: &str) -> PathBuf {
    repo_root().join("tests/py").join(name)
}

/// Runs `tests/py/<script>` with `args` to completion; panics with its output (and `context`)
/// when it fails; returns its stdout.
pub fn run_py(script: &str, args: &[&std::ffi::OsStr], context: &str) -> String {
    let out = Command::new(python())
        .arg(py_script(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}\n{context}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn create_container(url: &str, endpoint: &str) {
    let out = Command::new(python())
        .arg(py_script("create_bucket.py"))
        .arg(url)
        .arg(endpoint)
        .output()
        .expect("run create_bucket.py");
    assert!(
        out.status.success(),
        "create_bucket.py {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let res = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Deletes `name` and creates it again, empty, with `partitions` (Kafka deletes
/// asynchronously: the create is retried while the old topic is still being removed).
pub async fn recreate_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&[name], &opts).await.unwrap() {
        r.unwrap_or_else(|(t, e)| panic!("delete topic {t}: {e}"));
    }
    let start = Instant::now();
    loop {
        let res = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &opts,
            )
            .await
            .unwrap();
        match res.into_iter().next().unwrap() {
            Ok(_) => return,
            Err((t, e)) => assert!(
                start.elapsed() < Duration::from_secs(60),
                "recreate topic {t}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes the records of `topic`/`partition` before `before` (what retention does).
pub async fn delete_records(topic: &str, partition: i32, before: i64) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(before))
        .unwrap();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let done = admin.delete_records(&tpl, &opts).await.unwrap();
    for e in done.elements() {
        e.error()
            .unwrap_or_else(|e| panic!("delete records of {topic}: {e}"));
    }
}

/// A registry server in this test process; returns its URL and a client.
pub async fn registry() -> (String, RegistryClient) {
    let (addr, _task) = schema_registry::server::spawn("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let url = format!("http://{addr}");
    let client = RegistryClient::new(RegistryConfig::new(&url)).unwrap();
    (url, client)
}

/// Produced records: (partition, offset) -> order id.
pub type Produced = BTreeMap<(i32, i64), i64>;

/// Produces orders `ids` round-robin over `partitions`; returns where each landed.
pub async fn produce(
    topic: &str,
    id: SchemaId,
    ids: std::ops::Range<i64>,
    partitions: i32,
) -> Produced {
    produce_compressed(topic, id, ids, partitions, "none").await
}

/// [`produce`] in batches compressed with `codec` (`none`, `gzip`, `snappy`, `lz4`, `zstd`).
pub async fn produce_compressed(
    topic: &str,
    id: SchemaId,
    ids: std::ops::Range<i64>,
    partitions: i32,
    codec: &str,
) -> Produced {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .set("compression.type", codec)
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap();
    let schema = order_schema();
    let mut futs = Vec::new();
    for i in ids {
        let order = Order::generate(i);
        let payload = wire::frame(id, &order.encode(&schema));
        let p = (i % partitions as i64) as i32;
        let producer = producer.clone();
        let topic = topic.to_string();
        futs.push(async move {
            let rec = FutureRecord::to(&topic)
                .partition(p)
                .key(&order.order_id)
                .payload(&payload);
            let d = producer
                .send(rec, Duration::from_secs(30))
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            ((d.partition, d.offset), i)
        });
    }
    let mut out = BTreeMap::new();
    let results = futures::future::join_all(futs).await;
    for (k, v) in results {
        assert!(
            out.insert(k, v).is_none(),
            "duplicate delivery position {k:?}"
        );
    }
    out
}

/// The order schema plus a nullable `coupon` string: a compatible second version.
pub fn order_v2_schema() -> String {
    let mut v: Value = serde_json::from_str(ORDER_SCHEMA).unwrap();
    v["fields"].as_array_mut().unwrap().push(serde_json::json!(
        {"name": "coupon", "type": ["null", "string"], "default": null}
    ));
    v.to_string()
}

/// The coupon a v2 order carries.
pub fn coupon(id: i64) -> String {
    format!("C{id}")
}

/// An order framed with the v2 schema (registered as `v2`), its coupon set.
pub fn frame_order_v2(v2: SchemaId, schema: &apache_avro::Schema, id: i64) -> Vec<u8> {
    let apache_avro::types::Value::Record(mut fields) = Order::generate(id).to_avro_value() else {
        unreachable!("an order is a record")
    };
    fields.push((
        "coupon".into(),
        apache_avro::types::Value::Union(
            1,
            Box::new(apache_avro::types::Value::String(coupon(id))),
        ),
    ));
    wire::frame(
        v2,
        &apache_avro::to_avro_datum(schema, apache_avro::types::Value::Record(fields)).unwrap(),
    )
}

/// Registers v1 and v2 of the order schema, then produces orders `ids` in order to partition 0:
/// ids below `v2_from` with v1, the rest with v2. Returns where each landed.
pub async fn produce_evolving(
    client: &RegistryClient,
    topic: &str,
    ids: std::ops::Range<i64>,
    v2_from: i64,
) -> Produced {
    let v1 = register_orders(client, topic).await;
    let v2_text = order_v2_schema();
    let v2 = client
        .register(&format!("{topic}-value"), &v2_text)
        .await
        .unwrap();
    let (s1, s2) = (
        order_schema(),
        apache_avro::Schema::parse_str(&v2_text).unwrap(),
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut out = Produced::new();
    // One at a time, in order: the v1 prefix is what the first flushes see.
    for i in ids {
        let payload = if i < v2_from {
            wire::frame(v1, &Order::generate(i).encode(&s1))
        } else {
            frame_order_v2(v2, &s2, i)
        };
        let d = producer
            .send(
                FutureRecord::<(), _>::to(topic)
                    .partition(0)
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        out.insert((d.partition, d.offset), i);
    }
    out
}

/// One Debezium change for `produce_changes`: op (`c`, `u`, `d`), key id, and the after image
/// (ignored for deletes).
pub type Change = (&'static str, i64, Value);

/// One Debezium change event (MySQL connector shape, JSON converter without schemas) for table
/// `inventory.customers`; `pos` orders the source's binlog positions and timestamps.
pub fn debezium_json(op: &str, before: Value, after: Value, pos: i64) -> String {
    serde_json::json!({
        "before": before, "after": after,
        "source": {"connector": "mysql", "ts_ms": 1_790_000_000_000i64 + pos, "db": "inventory",
                   "table": "customers", "file": "mysql-bin.000004", "pos": pos * 10},
        "op": op, "ts_ms": 1_790_000_000_500i64 + pos
    })
    .to_string()
}

/// Produces Debezium JSON change events (MySQL connector shape, JSON converter without
/// schemas) keyed by id to partition 0 of `topic`, with a tombstone after every delete.
/// Returns the source's final state (id -> after image) and the number of records sent.
pub async fn produce_changes(topic: &str, changes: &[Change]) -> (BTreeMap<i64, Value>, i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let mut state: BTreeMap<i64, Value> = BTreeMap::new();
    let mut sent = 0i64;
    for (pos, (op, id, image)) in changes.iter().enumerate() {
        let (before, after) = match *op {
            "c" => (Value::Null, image.clone()),
            "u" => (state[id].clone(), image.clone()),
            "d" => (state[id].clone(), Value::Null),
            other => panic!("unknown op {other}"),
        };
        let value = debezium_json(op, before, after, pos as i64);
        let key = id.to_string();
        let mut records = vec![Some(value)];
        if *op == "d" {
            records.push(None);
            state.remove(id);
        } else {
            state.insert(*id, image.clone());
        }
        for payload in records {
            let mut rec = FutureRecord::<String, String>::to(topic)
                .partition(0)
                .key(&key);
            if let Some(p) = &payload {
                rec = rec.payload(p);
            }
            producer
                .send(rec, Duration::from_secs(10))
                .await
                .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
            sent += 1;
        }
    }
    (state, sent)
}

pub async fn register_orders(client: &RegistryClient, topic: &str) -> SchemaId {
    client
        .register(&format!("{topic}-value"), ORDER_SCHEMA)
        .await
        .unwrap()
}

/// A sink config for the order workload.
pub fn config(topic: &str, group: &str, registry: &str, store: &Store, extra_sink: &str) -> String {
    config_with(topic, group, registry, store, r#"["day(ts)"]"#, extra_sink)
}

/// A sink config with explicit `partition_by`.
pub fn config_with(
    topic: &str,
    group: &str,
    registry: &str,
    store: &Store,
    partition_by: &str,
    extra_sink: &str,
) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{kafka}"
group_id = "{group}"
properties = {{ {membership}, "topic.metadata.refresh.interval.ms" = "1000" }}

[schema_registry]
url = "{registry}"

[pipeline]
drain_timeout = "20s"

[[sink]]
name = "orders"
topics = ["{topic}"]
table = "{url}"
storage = {opts}
partition_by = {partition_by}
flush = {{ max_rows = 400, max_latency = "1s" }}
{extra_sink}
"#,
        kafka = kafka(),
        url = store.url,
        opts = store.toml_options(),
        membership = group_properties(),
    )
}

/// Sleeps until just after the next latency tick of `max_latency` on the epoch grid (multiples
/// of `max_latency` since the epoch), where a process started with `LAKESINK_TICK_PHASE=0`
/// cuts its latency flushes: records produced in the following `max_latency` minus a margin are
/// all cut at the same tick.
pub async fn just_after_latency_tick(max_latency: Duration) {
    let period = max_latency.as_millis() as u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let next = (now / period + 1) * period;
    tokio::time::sleep(Duration::from_millis(next - now + 100)).await;
}

/// A running `lakesink` process whose stderr is captured.
pub struct Lakesink {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Lakesink {
    pub fn start(config_text: &str, extra_env: &[(&str, &str)]) -> Lakesink {
        let dir = scratch("cfg");
        let path = dir.join("lakesink.toml");
        std::fs::write(&path, config_text).unwrap();
        Self::start_args(&["run", "--config", path.to_str().unwrap()], extra_env)
    }

    /// Starts `lakesink run` on `config_text` serving `/metrics` and the probes on a free
    /// port: the process and that server's base URL (`http://127.0.0.1:PORT`).
    pub fn start_serving(config_text: &str, extra_env: &[(&str, &str)]) -> (Lakesink, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = scratch("cfg").join("lakesink.toml");
        std::fs::write(&path, config_text).unwrap();
        let listen = format!("127.0.0.1:{port}");
        let args = [
            "run",
            "--config",
            path.to_str().unwrap(),
            "--http-listen",
            &listen,
        ];
        (
            Self::start_args(&args, extra_env),
            format!("http://{listen}"),
        )
    }

    /// Starts `lakesink` with explicit arguments.
    pub fn start_args(args: &[&str], extra_env: &[(&str, &str)]) -> Lakesink {
        // LAKESINK_TEST_BIN: a copy of the binary, for long runs that must not see a rebuild.
        let bin = std::env::var("LAKESINK_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_lakesink").to_string());
        let mut cmd = Command::new(bin);
        cmd.args(args)
            // LAKESINK_TEST_LOG: another log filter for the processes a test starts.
            .env(
                "LAKESINK_LOG",
                std::env::var("LAKESINK_TEST_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn lakesink");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Lakesink { child, stderr }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) {
        self.wait_for_lines(needle, 1, timeout);
    }

    /// Waits until `count` stderr lines contain `needle`.
    pub fn wait_for_lines(&mut self, needle: &str, count: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self
                .stderr
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
                >= count
            {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "lakesink exited ({status}) before printing `{needle}`:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "no `{needle}` within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGKILL, then reap.
    pub fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit. Waits for the start-up line first: a signal sent
    /// before `main` has run would meet the default action, which no program can handle.
    pub fn stop(mut self) -> String {
        if self.child.try_wait().unwrap().is_none() {
            self.wait_for_line("lakesink started", Duration::from_secs(60));
        }
        self.signal("TERM");
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                assert!(
                    status.success(),
                    "lakesink exited with {status}:\n{}",
                    self.log()
                );
                return self.log();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "lakesink did not stop within 60 s of SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `lakesink run --until-caught-up` on `config_text` to its end; asserts it exits 0 and
/// returns its log.
pub fn catch_up(config_text: &str, extra_env: &[(&str, &str)]) -> String {
    let (status, log) = catch_up_status(config_text, extra_env);
    assert!(status.success(), "{status}:\n{log}");
    log
}

/// Runs `lakesink run --until-caught-up` on `config_text` to its end: its exit status and log.
pub fn catch_up_status(
    config_text: &str,
    extra_env: &[(&str, &str)],
) -> (std::process::ExitStatus, String) {
    let path = scratch("catch-up").join("lakesink.toml");
    std::fs::write(&path, config_text).unwrap();
    let args = [
        "run",
        "--until-caught-up",
        "--config",
        path.to_str().unwrap(),
    ];
    let mut proc_ = Lakesink::start_args(&args, extra_env);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = proc_.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "still running:\n{}",
            proc_.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    (status, proc_.log())
}

/// A failed test does not leave its lakesink processes running (they would keep loading the
/// shared services and slow every later test).
impl Drop for Lakesink {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sum of committed rows according to the commit markers.
pub async fn committed_rows(store: &Store, topic: &str) -> u64 {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let t = store.table_store();
    let prefix = t.path(["_lakesink", "commits", topic]);
    let metas: Vec<_> = t
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .unwrap_or_default();
    let mut rows = 0;
    for m in metas {
        let bytes = t
            .store
            .get(&m.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let marker: sinks::parquet::Marker = serde_json::from_slice(&bytes).unwrap();
        rows += marker.rows;
    }
    rows
}

/// Waits until the markers account for `n` rows.
pub async fn wait_rows(
    store: &Store,
    topic: &str,
    n: u64,
    proc_: &mut Lakesink,
    timeout: Duration,
) {
    let start = Instant::now();
    loop {
        let rows = committed_rows(store, topic).await;
        if rows >= n {
            return;
        }
        if let Some(status) = proc_.child.try_wait().unwrap() {
            panic!(
                "lakesink exited ({status}) with {rows}/{n} rows committed:\n{}",
                proc_.log()
            );
        }
        assert!(
            start.elapsed() < timeout,
            "only {rows}/{n} rows committed after {timeout:?}:\n{}",
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asserts that the table holds every produced record exactly once with the right values.
pub fn assert_exactly_once(table: &Value, produced: &Produced) {
    let rows = table["rows"].as_array().expect("rows");
    let mut seen: BTreeMap<(i32, i64), &Value> = BTreeMap::new();
    for r in rows {
        let key = (r["p"].as_i64().unwrap() as i32, r["o"].as_i64().unwrap());
        assert!(
            seen.insert(key, r).is_none(),
            "duplicate row at partition/offset {key:?}"
        );
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
    let extra: Vec<_> = seen
        .keys()
        .filter(|k| !produced.contains_key(k))
        .take(10)
        .collect();
    assert!(extra.is_empty(), "rows that were never produced: {extra:?}");
    for (key, id) in produced {
        let row = seen[key];
        let expected = Order::generate(*id).expected_json();
        for (field, value) in expected.as_object().unwrap() {
            assert_eq!(
                &row[field], value,
                "field `{field}` of {key:?} (order {id})"
            );
        }
        // The Hive partition is the UTC day of `ts`.
        let ts = expected["ts"].as_i64().unwrap();
        let day = chrono::DateTime::from_timestamp_millis(ts)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string();
        assert_eq!(
            row["day"].as_str(),
            Some(day.as_str()),
            "day partition of {key:?}"
        );
    }
    let duck = &table["duckdb"];
    assert_eq!(
        duck["count"].as_u64(),
        Some(produced.len() as u64),
        "duckdb count: {duck}"
    );
    assert_eq!(
        duck["distinct"].as_u64(),
        Some(produced.len() as u64),
        "duckdb distinct: {duck}"
    );
}

/// Number of commit markers of `topic`.
pub async fn committed_markers(store: &Store, topic: &str) -> usize {
    use futures::TryStreamExt;
    let t = store.table_store();
    let prefix = t.path(["_lakesink", "commits", topic]);
    let metas: Vec<_> = t
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .unwrap_or_default();
    metas.len()
}

/// `host:port` of an `http://` URL.
pub fn addr_of(url: &str) -> std::net::SocketAddr {
    let u = url::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
        .parse()
        .unwrap()
}

/// A dead letter's source position: (`lakesink.source.topic`, `.partition`, `.offset`).
pub type SourcePosition = (String, i32, i64);

/// Reads a dead-letter topic from the start until `done` holds and 3 s pass without a new dead
/// letter, or 60 s: how often each source position was dead-lettered.
///
/// It reads `read_committed`, as a user of the dead-letter topic does: a copy of a dead letter
/// in an aborted transaction (a fenced zombie's) is not there, and a duplicate is one that two
/// committed transactions hold.
pub async fn dead_letters(
    dlq: &str,
    done: impl Fn(&BTreeMap<SourcePosition, u32>) -> bool,
) -> BTreeMap<SourcePosition, u32> {
    dead_letters_with(dlq, "read_committed", done).await
}

/// [`dead_letters`] read with `isolation`: `read_uncommitted` sees committed dead letters that
/// sit above another writer's open transaction (a `read_committed` reader stops below it).
pub async fn dead_letters_with(
    dlq: &str,
    isolation: &str,
    done: impl Fn(&BTreeMap<SourcePosition, u32>) -> bool,
) -> BTreeMap<SourcePosition, u32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .unwrap();
    consumer.subscribe(&[dlq]).unwrap();
    let mut dead = BTreeMap::new();
    let start = Instant::now();
    let mut last_new = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let h = m.headers().expect("dead letters carry headers");
            let get = |k: &str| -> String {
                let v = h.iter().find(|x| x.key == k).and_then(|x| x.value).unwrap();
                String::from_utf8_lossy(v).into_owned()
            };
            *dead
                .entry((
                    get("lakesink.source.topic"),
                    get("lakesink.source.partition").parse().unwrap(),
                    get("lakesink.source.offset").parse().unwrap(),
                ))
                .or_default() += 1;
            last_new = Instant::now();
        } else if done(&dead) && last_new.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    dead
}

/// Runs the `lakesink` binary with `args` (and `env`) to completion, asserts it succeeded, and
/// returns its stdout.
pub fn lakesink_cli(args: &[&str], env: &[(&str, &str)]) -> String {
    lakesink_cli_logs(args, env).0
}

/// [`lakesink_cli`]'s stdout, and what it logged at `warn` and above (stderr).
pub fn lakesink_cli_logs(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(args)
        .envs(env.iter().copied())
        .env("LAKESINK_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lakesink {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `lakesink check` on `config_text` (errors only in the log): its exit code, and its stdout
/// and stderr together.
pub fn lakesink_check(config_text: &str) -> (i32, String) {
    let path = scratch("check").join("lakesink.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["check", "--config"])
        .arg(&path)
        .env("LAKESINK_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}
