//! The deployment files match the binary: they parse, the image's entrypoint, port, probe paths
//! and config keys are the ones `lakesink` accepts, the sample configs pass `lakesink check`
//! against locally started services, and the Grafana dashboard and Prometheus alert rules are
//! valid PromQL over metrics the binary exports.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

fn yaml() -> Value {
    let out = Command::new(python())
        .arg(py_script("check_deploy.py"))
        .arg(deploy())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy YAML does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dockerfile_entrypoint_port_user_and_healthcheck_match_the_binary() {
    let docker = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(docker.contains("ENTRYPOINT [\"lakesink\"]"));
    assert!(docker.contains("EXPOSE 9090"));
    assert!(docker.contains("USER 10001"));
    assert!(docker.contains(
        "CMD [\"lakesink\", \"healthcheck\", \"--url\", \"http://127.0.0.1:9090/healthz\"]"
    ));
    assert!(docker.contains("\"--http-listen\", \"0.0.0.0:9090\""));
    // The healthcheck subcommand exists and fails cleanly when nothing listens.
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["healthcheck", "--url", "http://127.0.0.1:9/healthz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn kubernetes_probes_ports_grace_and_config_agree() {
    let y = yaml();
    let dep = &y["k8s"]["Deployment"];
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    assert_eq!(args[0], "run");
    let listen = &args[args.iter().position(|a| a == "--http-listen").unwrap() + 1];
    assert!(listen.ends_with(":9090"), "{listen}");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(pod["securityContext"]["runAsUser"], 10001);
    let config_path = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    let key = config_path
        .strip_prefix(&format!("{mount}/"))
        .expect("config inside the mount");
    let toml = y["k8s"]["ConfigMap"]["data"][key]
        .as_str()
        .expect("the ConfigMap holds the config");
    let cfg = lakesink::config::Config::from_toml_with_env(toml, |k| {
        Some(if k.ends_with("_URL") {
            "https://registry.example".into()
        } else {
            "x".into()
        })
    })
    .and_then(lakesink::config::Config::validate)
    .expect("the ConfigMap's config is valid");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        Duration::from_secs(grace) > cfg.drain_timeout + Duration::from_secs(10),
        "terminationGracePeriodSeconds {grace} must exceed drain_timeout {:?}",
        cfg.drain_timeout
    );
    assert_eq!(cfg.http_listen.map(|a| a.port()), Some(9090));
    let keda = &y["k8s"]["ScaledObject"];
    assert_eq!(
        keda["spec"]["scaleTargetRef"]["name"],
        dep["metadata"]["name"]
    );
    assert_eq!(
        keda["spec"]["triggers"][0]["metadata"]["consumerGroup"],
        cfg.group_id.as_str()
    );
    assert!(y["k8s"]["PodDisruptionBudget"]["spec"]["maxUnavailable"].is_u64());
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_services_run_with_their_arguments_and_config() {
    let y = yaml();
    let services = &y["compose"]["services"];
    // The registry service's command starts our registry.
    let mut reg_args = strs(&services["registry"]["command"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let li = reg_args.iter().position(|a| a == "--listen").unwrap() + 1;
    reg_args[li] = format!("127.0.0.1:{port}");
    let di = reg_args.iter().position(|a| a == "--data").unwrap() + 1;
    reg_args[di] = scratch("registry-data").display().to_string();
    let mut registry = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(&reg_args)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if reqwest::get(format!("{url}/subjects"))
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the compose registry command did not serve");

    // The lakesink service mounts the sample config where its command reads it, and that
    // config passes `lakesink check` against local services.
    let cmd = strs(&services["lakesink"]["command"]);
    let config_path = &cmd[cmd.iter().position(|a| a == "--config").unwrap() + 1];
    let volume = services["lakesink"]["volumes"][0].as_str().unwrap();
    let (host, rest) = volume.split_once(':').unwrap();
    assert_eq!(rest.trim_end_matches(":ro"), config_path);
    let sample = deploy().join(host.trim_start_matches("./"));
    let topic = unique("shop.orders");
    create_topic(&topic, 1).await;
    let store = Store::s3("orders");
    let bucket = store
        .url
        .strip_prefix("s3://")
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_lakesink"))
            .args(["check", "--config"])
            .arg(&sample)
            .env("LAKESINK_LOG", "warn")
            .env("KAFKA_BOOTSTRAP", kafka())
            .env("SCHEMA_REGISTRY_URL", &url)
            .env("ORDERS_TOPIC", &topic)
            .env("LAKE_BUCKET", &bucket)
            .env("S3_ENDPOINT", s3())
            .env("S3_ACCESS_KEY_ID", "test")
            .env("S3_SECRET_ACCESS_KEY", "test")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let _ = registry.kill();
    let _ = registry.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Kafka, the dead-letter topic (created at start-up), the registry, the table.
    assert_eq!(stdout.matches("ok    ").count(), 4, "{stdout}");
    assert!(
        stdout.contains("ok    dead-letter topic `lakesink.dlq`"),
        "{stdout}"
    );
}

/// The series `/metrics` offers, as `render` (what the binary serves) writes them: counters with
/// `_total`, histograms as `_bucket`, `_sum` and `_count`.
fn exported_series() -> BTreeSet<String> {
    let p = std::sync::Arc::new(lakesink::pipeline::Progress::default());
    let (_, text) = lakesink::telemetry::render(&p, false);
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if (w.next(), w.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (name, kind) = (w.next().unwrap(), w.next().unwrap());
        match kind {
            "histogram" => {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")))
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// Parses `expr` as PromQL (Grafana's `$__rate_interval` as a duration) and returns the
/// lakesink metrics it queries, each checked to be exported.
fn checked_promql(what: &str, expr: &str, exported: &BTreeSet<String>) -> Vec<String> {
    let expr = expr.replace("$__rate_interval", "5m");
    promql_parser::parser::parse(&expr)
        .unwrap_or_else(|e| panic!("{what}: not valid PromQL ({e}):\n{expr}"));
    let names: Vec<String> = regex::Regex::new(r"\blakesink_[a-z0-9_]+")
        .unwrap()
        .find_iter(&expr)
        .map(|m| m.as_str().to_string())
        .collect();
    assert!(
        !names.is_empty(),
        "{what} queries no lakesink metric: {expr}"
    );
    for n in &names {
        assert!(
            exported.contains(n),
            "{what} queries `{n}`, which lakesink does not export (it does: {exported:?})"
        );
    }
    names
}

#[test]
fn alert_rules_and_dashboard_query_what_the_binary_exports() {
    let exported = exported_series();
    assert!(
        exported.contains("lakesink_freshness_seconds_bucket"),
        "{exported:?}"
    );
    let rules = &yaml()["prometheus"]["alerts.yaml"]["groups"];
    let mut alerts = BTreeSet::new();
    for group in rules.as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let name = rule["alert"].as_str().expect("an alert name");
            checked_promql(name, rule["expr"].as_str().expect("expr"), &exported);
            assert!(
                rule["labels"]["severity"].is_string(),
                "{name}: no severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: no summary"
            );
            assert!(rule["annotations"]["description"].is_string(), "{name}");
            alerts.insert(name.to_string());
        }
    }
    for wanted in [
        "LakesinkLagGrowing",
        "LakesinkFreshnessHigh",
        "LakesinkDeadLetters",
        "LakesinkPartitionQuarantined",
        "LakesinkNotReady",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} alert: {alerts:?}");
    }

    let text = std::fs::read_to_string(deploy().join("grafana/lakesink.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queried = BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("a panel title");
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            queried.extend(checked_promql(
                title,
                t["expr"].as_str().unwrap(),
                &exported,
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["definition"].as_str() {
            let metric = q
                .trim_start_matches("label_values(")
                .split(',')
                .next()
                .unwrap();
            assert!(exported.contains(metric), "variable {}: {q}", v["name"]);
        }
    }
    // What an operator watches: lag, throughput, freshness, commits, fences, dead letters,
    // buffer, errors.
    for wanted in [
        "lakesink_consumer_lag",
        "lakesink_records_consumed_total",
        "lakesink_freshness_seconds_bucket",
        "lakesink_commits_total",
        "lakesink_fenced_total",
        "lakesink_dead_letters_total",
        "lakesink_buffer_bytes",
        "lakesink_errors_total",
    ] {
        assert!(
            queried.contains(wanted),
            "the dashboard has no panel on {wanted}"
        );
    }
}

/// The build says what it needs: `rust-version` is what the locked dependencies require (the
/// highest of theirs), the image builds with that toolchain and `--locked`, and every Python
/// test tool is pinned with its hash.
#[test]
fn the_build_states_what_it_needs() {
    let root = repo_root();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let ours = regex::Regex::new(r#"(?m)^rust-version = "([0-9.]+)""#)
        .unwrap()
        .captures(&manifest)
        .expect("a rust-version")[1]
        .to_string();
    let version = |v: &str| -> Vec<u32> {
        let mut v: Vec<u32> = v.split('.').map(|x| x.parse().unwrap()).collect();
        v.resize(3, 0);
        v
    };
    // The locked registry packages, read where cargo unpacked them.
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap();
    let registry = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"))
        .join("registry/src");
    let unpacked: Vec<PathBuf> = std::fs::read_dir(&registry)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let package = regex::Regex::new(
        r#"\[\[package\]\]\nname = "([^"]+)"\nversion = "([^"]+)"\nsource = "registry"#,
    )
    .unwrap();
    let wanted = regex::Regex::new(r#"(?m)^rust-version = "([0-9.]+)""#).unwrap();
    let (mut read, mut highest) = (0, (vec![0], String::new()));
    for c in package.captures_iter(&lock) {
        let Some(toml) = unpacked
            .iter()
            .map(|d| d.join(format!("{}-{}/Cargo.toml", &c[1], &c[2])))
            .find(|p| p.exists())
        else {
            continue;
        };
        read += 1;
        if let Some(m) = wanted.captures(&std::fs::read_to_string(toml).unwrap()) {
            let v = version(&m[1]);
            if v > highest.0 {
                highest = (v, format!("{} {} needs {}", &c[1], &c[2], &m[1]));
            }
        }
    }
    assert!(
        read > 100,
        "the dependencies are unpacked under {registry:?}"
    );
    assert!(
        version(&ours) >= highest.0,
        "rust-version = {ours}, but {}",
        highest.1
    );
    let docker = std::fs::read_to_string(deploy().join("Dockerfile")).unwrap();
    assert!(
        docker.contains(&format!("FROM rust:{ours}-")),
        "the image builds with Rust {ours}"
    );
    assert!(
        docker.contains("cargo build --locked"),
        "the image builds --locked"
    );
    let reqs = std::fs::read_to_string(root.join("scripts/requirements-test.txt")).unwrap();
    let pins: Vec<&str> = reqs.lines().filter(|l| l.contains("==")).collect();
    assert!(pins.len() > 20, "{reqs}");
    for block in reqs.split("==").skip(1) {
        let hashed = block
            .split_once('\n')
            .map(|(_, rest)| rest.trim_start().starts_with("--hash=sha256:"))
            .unwrap_or(false);
        assert!(
            hashed,
            "a pin without its hash: {}",
            &block[..block.len().min(80)]
        );
    }
}
