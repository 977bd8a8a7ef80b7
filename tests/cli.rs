//! The command line: config errors name the key, `check` reaches every dependency.

mod common;

use std::process::Command;

use common::*;

fn check(config_text: &str) -> (i32, String, String) {
    let dir = scratch("cli");
    let path = dir.join("lakesink.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["check", "--config"])
        .arg(&path)
        .env("LAKESINK_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "g"

[schema_registry]
url = "http://127.0.0.1:9"
basic_auth = { username = "sr-key", password = "sr-secret-value" }

[[sink]]
name = "orders"
topics = ["orders"]
table = "file:///tmp/lakesink-cli-test/orders"
"#;

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let (code, _, err) =
        check(&GOOD.replace("group_id = \"g\"", "group_id = \"g\"\ngroupid = \"h\""));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`kafka.groupid`") && err.contains("unknown field"),
        "{err}"
    );
}

#[test]
fn bad_table_url_is_rejected_with_its_key() {
    let (code, _, err) =
        check(&GOOD.replace("file:///tmp/lakesink-cli-test/orders", "lake/orders"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`sink[0].table`"), "{err}");
    // What the user typed, not a placeholder, and how to write it.
    assert!(err.contains("`lake/orders` has no scheme"), "{err}");
    assert!(err.contains("file:///abs/dir"), "{err}");
    // Two slashes make `tmp` a host: a config error (2), not a runtime failure (1).
    let (code, _, err) = check(&GOOD.replace(
        "file:///tmp/lakesink-cli-test/orders",
        "file://tmp/lakesink-cli-test/orders",
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`sink[0].table`") && err.contains("file:///tmp/lakesink-cli-test/orders"),
        "{err}"
    );
}

#[test]
fn librdkafka_property_typos_and_bad_values_are_config_errors() {
    for (props, want) in [
        (
            r#"{ "fetch.wait.max.msx" = "100" }"#,
            r#"`kafka.properties."fetch.wait.max.msx"`: librdkafka has no such property"#,
        ),
        (
            r#"{ "fetch.wait.max.ms" = "soon" }"#,
            r#"`kafka.properties."fetch.wait.max.ms"`: librdkafka refuses it"#,
        ),
    ] {
        let (code, _, err) = check(&GOOD.replace(
            "group_id = \"g\"",
            &format!("group_id = \"g\"\nproperties = {props}"),
        ));
        assert_eq!(code, 2, "{props}: {err}");
        assert!(err.contains(want), "{props}: {err}");
    }
}

/// With the broker unreachable, librdkafka retries about 20 times a second and reports each
/// failure ("1/1 brokers are down", "Connect to ... failed"): lakesink logs each message once,
/// then at most once per 30 s (librdkafka's own log lines suppress repeats likewise). Counted
/// over the 5 s after the first report (which a loaded machine may delay).
#[test]
fn an_unreachable_broker_is_logged_once_not_twenty_times_a_second() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    let dir = scratch("cli");
    let path = dir.join("down.toml");
    std::fs::write(&path, GOOD).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("LAKESINK_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
    let sink = lines.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    let started = Instant::now();
    let first = loop {
        let seen = lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains("127.0.0.1:9") || l.contains("brokers are down"))
            .map(|(at, _)| *at);
        if let Some(at) = seen {
            break at;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let log: Vec<String> = lines
                .lock()
                .unwrap()
                .iter()
                .map(|(_, l)| l.clone())
                .collect();
            panic!(
                "the unreachable broker was never reported:\n{}",
                log.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep((first + Duration::from_secs(5)).saturating_duration_since(Instant::now()));
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines.lock().unwrap();
    // Every line about the unreachable broker (librdkafka's and lakesink's).
    let down = lines
        .iter()
        .filter(|(at, l)| {
            (l.contains("127.0.0.1:9")
                || l.contains("brokers are down")
                || l.contains("BrokerTransportFailure"))
                && *at <= first + Duration::from_secs(5)
        })
        .count();
    let log: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    assert!(
        (1..=8).contains(&down),
        "the unreachable broker was logged {down} times in 5 s:\n{}",
        log.join("\n")
    );
}

#[test]
fn auto_commit_cannot_be_forced_on() {
    let (code, _, err) = check(&GOOD.replace(
        "group_id = \"g\"",
        "group_id = \"g\"\nproperties = { \"enable.auto.commit\" = \"true\" }",
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`kafka.properties.\"enable.auto.commit\"`"),
        "{err}"
    );
    assert!(err.contains("cannot be set"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reaches_every_dependency_and_names_what_fails() {
    let topic = unique("check");
    create_topic(&topic, 1).await;
    let (registry_url, _client) = registry().await;
    let store = Store::s3("orders");
    let good = config(&topic, "g", &registry_url, &store, "");
    let (code, out, err) = tokio::task::spawn_blocking({
        let good = good.clone();
        move || check(&good)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.matches("ok    ").count(), 3, "{out}");
    // At the default log level, `check` prints its results, not the whole config nor the
    // clients' statistics.
    let path = scratch("cli").join("quiet.toml");
    std::fs::write(&path, &good).unwrap();
    let quiet = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("LAKESINK_LOG")
        .output()
        .unwrap();
    let logged = String::from_utf8_lossy(&quiet.stderr);
    assert!(quiet.status.success(), "{logged}");
    assert!(
        !logged.contains("group=g") && !logged.contains("Client stats"),
        "check logged its config or statistics:\n{logged}"
    );

    // The registry is down and a topic is missing: both are named, and secrets are not printed.
    let bad = good
        .replace(&registry_url, "http://127.0.0.1:9")
        .replace(&format!("[\"{topic}\"]"), "[\"no-such-topic\"]")
        .replace("url = \"http://127.0.0.1:9\"", "url = \"http://127.0.0.1:9\"\nbasic_auth = { username = \"u\", password = \"sr-secret-value\" }");
    let (code, out, err) = tokio::task::spawn_blocking(move || check(&bad))
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("FAIL  schema registry"), "{out}");
    assert!(out.contains("no-such-topic"), "{out}");
    assert!(
        !out.contains("sr-secret-value") && !err.contains("sr-secret-value"),
        "{out}\n{err}"
    );
}

/// Runs `lakesink bench` with `args` (warnings only on stderr); its stdout, once it succeeded.
fn bench(args: &[&str]) -> String {
    lakesink_cli(&[&["bench"], args].concat(), &[])
}

/// The line of a bench report that starts with `label`.
fn report_line<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in {stdout}"))
}

/// `lakesink bench --isolate` decodes and encodes every record with the pipeline's decoder and
/// the sinks' Parquet settings (it fails when a row is missing) and reports per-core rates.
#[test]
fn bench_isolate_measures_decode_and_encode() {
    for format in ["avro", "json"] {
        let stdout = bench(&["--isolate", "--records", "3000", "--format", format]);
        for step in ["decode:", "encode:", "both:"] {
            let line = report_line(&stdout, step);
            assert!(line.contains("records/s per core"), "{format}: {line}");
        }
    }
}

/// An append bench reports the plain loop's CPU per record and the floor: the cheaper consumer's
/// CPU per record (the plain loop or the pipeline's) plus the same records decoded and encoded
/// alone, and the most records/s it allows on this machine's cores.
#[test]
fn bench_append_reports_the_floor_against_the_plain_loop() {
    // Enough records that each consumer fetches several times after its first record: with
    // 3,000 (one fetch per partition) both consumers' CPU from the first record could read 0.
    let stdout = bench(&[
        "--format",
        "json",
        "--records",
        "50000",
        "--partitions",
        "2",
    ]);
    assert!(
        report_line(&stdout, "baseline:").contains("us CPU per record"),
        "{stdout}"
    );
    let floor = report_line(&stdout, "floor:");
    // "consume A + decode alone B + encode alone C = F us CPU per record: at most R records/s
    // on N cores; this run spent S us per record (X.XXx the floor). Consume is the cheaper of
    // the plain loop (L, ...) and this run's poll and librdkafka threads (P)"
    let numbers: Vec<f64> = floor
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.trim_matches('.').parse().ok())
        .collect();
    let [consume, decode, encode, total, rate, cores, spent, ratio, plain_loop, ours] =
        numbers[..10]
    else {
        panic!("{floor}");
    };
    assert!((consume - plain_loop.min(ours)).abs() < 0.006, "{floor}");
    assert!(consume > 0.0 && decode > 0.0 && encode > 0.0, "{floor}");
    assert!((consume + decode + encode - total).abs() < 0.02, "{floor}");
    assert!((cores * 1e6 / total - rate).abs() / rate < 0.01, "{floor}");
    assert!((spent / total - ratio).abs() < 0.01, "{floor}");
}

/// `bench --broker` runs the same pipeline against the real broker (Apache Kafka in the tests):
/// every record committed, on one partition.
#[test]
fn bench_against_the_real_broker() {
    let stdout = bench(&[
        "--format",
        "json",
        "--records",
        "5000",
        "--partitions",
        "1",
        "--broker",
        &kafka(),
    ]);
    assert!(
        report_line(&stdout, "lakesink bench:").contains(&format!("broker {}", kafka())),
        "{stdout}"
    );
    assert!(
        report_line(&stdout, "pipeline:")
            .trim_start()
            .starts_with("pipeline:  5000 rows"),
        "{stdout}"
    );
}

/// `bench --mode upsert` reads the Delta table back: one row per order, each its last change,
/// for plain and Debezium changes; its output line counts the files the table references.
#[test]
fn bench_upsert_reads_back_one_row_per_order() {
    for format in ["avro", "debezium"] {
        let stdout = bench(&[
            "--kind",
            "delta",
            "--mode",
            "upsert",
            "--format",
            format,
            "--records",
            "3000",
            "--partitions",
            "2",
        ]);
        assert!(
            stdout.contains(
                "check:     1000 rows in 1 table(s), one per order, each its last change"
            ),
            "{format}: {stdout}"
        );
        let output = report_line(&stdout, "output:");
        let files: u64 = output
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{output}"));
        assert!(
            files > 0 && output.contains("in the tables at the end"),
            "{output}"
        );
    }
}

/// `bench --tables N --one-sink` upserts a database of N tables through one `topics_regex`
/// sink with a table template, and reads every table back.
#[test]
fn bench_one_sink_upserts_many_tables() {
    let stdout = bench(&[
        "--kind",
        "delta",
        "--mode",
        "upsert",
        "--format",
        "debezium",
        "--records",
        "3000",
        "--partitions",
        "1",
        "--tables",
        "7",
        "--one-sink",
    ]);
    assert!(
        stdout.contains("check:     1000 rows in 7 table(s), one per order, each its last change"),
        "{stdout}"
    );
    assert!(
        report_line(&stdout, "lakesink bench:").contains("7 topic(s)"),
        "{stdout}"
    );
}

/// With `LAKESINK_LOG` unset, a Delta run logs lakesink's own events at info, none of the
/// Delta kernel's or deltalake's per-commit info events (some print the whole snapshot), and no
/// ERROR.
#[test]
fn default_log_keeps_delta_internals_out() {
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args([
            "bench",
            "--kind",
            "delta",
            "--records",
            "3000",
            "--partitions",
            "2",
        ])
        .env_remove("LAKESINK_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("commits in") && stdout.contains("Delta log entries"),
        "{stdout}"
    );
    assert!(stderr.contains("lakesink::kafka"), "{stderr}");
    // The binary's jemalloc options are in force (jemalloc's own default is 4 arenas per CPU).
    assert!(
        stdout.contains("allocator: jemalloc, 2 arenas, background purging on"),
        "{stdout}"
    );
    for internal in ["buoyant_kernel", "deltalake_core"] {
        assert!(!stderr.contains(internal), "{internal} in:\n{stderr}");
    }
    // A clean run logs no ERROR: not even rust-rdkafka's on dropping the consumer that has
    // already left its group.
    assert!(!stderr.contains("ERROR"), "{stderr}");
    // stderr is a pipe here, as in a log file or a container: no colour escapes.
    assert!(!stderr.contains('\u{1b}'), "colour escapes in:\n{stderr}");
}

#[test]
fn bench_steady_upsert_reports_the_cost_per_change_on_a_built_table() {
    let out = bench(&[
        "--steady-upsert",
        "--table-rows",
        "4000,20000",
        "--records",
        "1500",
        "--flush-rows",
        "500",
    ]);
    for strategy in ["CopyOnWrite", "DeletionVectors"] {
        assert!(
            out.contains(&format!(
                "--steady-upsert ({strategy}): a local Delta table of 20000 rows in 4 files"
            )),
            "{out}"
        );
    }
    let per_change = report_line(&out, "per change:");
    assert!(
        per_change.contains("µs CPU") && per_change.contains("bytes written"),
        "{out}"
    );
    // Random keys touch every file: each of the 3 flushes rewrites files (copy-on-write) or
    // marks rows in them (deletion vectors).
    let per_flush = report_line(&out, "per flush:");
    let touched: f64 = per_flush
        .split("per flush:")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1.0..=4.0).contains(&touched), "{out}");
    assert!(out.contains("read back:  20000 rows, one per key"), "{out}");
    // The summary: one line per run; deletion vectors write a fraction of what copy-on-write
    // rewrites on the larger table.
    let amplification = |strategy: &str| -> f64 {
        let line = out
            .lines()
            .find(|l| l.contains("20000 rows,") && l.contains(strategy))
            .unwrap_or_else(|| panic!("no summary line for {strategy}: {out}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (cow, dv) = (
        amplification("CopyOnWrite"),
        amplification("DeletionVectors"),
    );
    assert!(
        dv * 10.0 < cow,
        "copy-on-write {cow}, deletion vectors {dv}: {out}"
    );
}

#[test]
fn bench_steady_upsert_compacts_a_randomly_loaded_table_into_one_file() {
    let out = bench(&[
        "--steady-upsert",
        "--table-rows",
        "20000",
        "--records",
        "1000",
        "--upsert",
        "deletion-vectors",
        "--load-order",
        "random",
        "--load-flush-rows",
        "2000",
        "--compact-first",
    ]);
    // Ten load flushes of random keys, merged by key into one file before the changes; the
    // read-back then finds every key once, each with its last change.
    assert!(
        out.contains("a local Delta table of 20000 rows in 1 files (")
            && out.contains("loaded in random order into 10 files, then compacted)"),
        "{out}"
    );
    assert!(out.contains("read back:  20000 rows, one per key"), "{out}");
}

/// Latency mode reports freshness and how many files a table partition gets per hour at that
/// rate (each Kafka partition commits its own file per flush).
#[test]
fn bench_latency_mode_reports_freshness_and_files_per_hour() {
    let out = bench(&[
        "--records",
        "3000",
        "--rate",
        "1500",
        "--max-latency",
        "500ms",
        "--partitions",
        "2",
    ]);
    assert!(
        report_line(&out, "latency:").contains("records/s with max_latency = 500ms"),
        "{out}"
    );
    let files = report_line(&out, "files:");
    let per_hour: f64 = files
        .split(" files per table partition per hour")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(per_hour > 0.0, "{out}");
    assert!(files.contains("from 2 Kafka partitions"), "{out}");
}

/// `import-connect` on databend-kafka-connect's published example, pointed at the test
/// services: the output validates, and `check` reaches the broker, the registry and Databend
/// with the variables it names set. No secret of the input is in the output.
#[tokio::test(flavor = "multi_thread")]
async fn an_imported_connector_config_passes_check() {
    let fixture = repo_root().join("tests/data/connect/databend.properties");
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .arg("import-connect")
        .arg(&fixture)
        .output()
        .unwrap();
    let toml = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{toml}{stderr}");
    assert!(stderr.contains("not mapped"), "{stderr}");
    assert!(
        !toml.contains("password = \"databend\""),
        "a secret was copied:\n{toml}"
    );
    assert!(toml.contains("#   DATABEND_PASSWORD"), "{toml}");
    // The example's server and user are the test server's.
    let server = url::Url::parse(&common::databend::databend_url()).unwrap();
    let toml = toml
        .replace(
            "http://localhost:8000/default",
            &format!(
                "http://{}:{}/default",
                server.host_str().unwrap(),
                server.port().unwrap()
            ),
        )
        .replace(
            "user = \"databend\"",
            &format!("user = \"{}\"", server.username()),
        );
    // The connector's topic, created here.
    let topic = unique("products");
    create_topic(&topic, 1).await;
    let toml = toml.replace(
        "topics = [\"products\"]",
        &format!("topics = [\"{topic}\"]"),
    );
    let (registry_url, _) = registry().await;
    let path = scratch("import").join("lakesink.toml");
    std::fs::write(&path, &toml).unwrap();
    let checked = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["check", "--config"])
        .arg(&path)
        .env("LAKESINK_LOG", "warn")
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka())
        .env("SCHEMA_REGISTRY_URL", &registry_url)
        .env("DATABEND_PASSWORD", server.password().unwrap())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(0), "{report}\n{toml}");
    assert!(report.contains("ok "), "{report}");
}
