//! The deployment files match the binary: they parse, the image's entrypoint, port, probe paths
//! and config keys are the ones `lakesink` accepts, and the sample configs pass `lakesink check`
//! against locally started services.

mod common;

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
    assert_eq!(stdout.matches("ok    ").count(), 3, "{stdout}");
}
