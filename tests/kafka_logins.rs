//! The logins of managed Kafka against the real broker's SASL_SSL listener (scripts/kafka.sh):
//! TLS with a certificate from a test CA that lakesink verifies, SASL PLAIN (Confluent Cloud,
//! Event Hubs) and SCRAM-SHA-512 (MSK), ACLs enforced.
//!
//! - Each login consumes a topic into a table end to end, exactly once, and `check` passes.
//! - A wrong password, an untrusted certificate, a user without ACLs on the topic and a group
//!   outside the user's ACLs each make `check` exit 1 with the cause and the key to fix, and
//!   the password never appears in the output.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn sasl_ssl() -> String {
    need("LAKESINK_TEST_KAFKA_SASL_SSL")
}
fn ca() -> String {
    need("LAKESINK_TEST_KAFKA_CA")
}

/// A config reaching the SASL_SSL listener with `(user, password, mechanism)`; `ca` trusted
/// if given.
fn sasl_config(
    (user, password, mechanism): (&str, &str, &str),
    ca: Option<&str>,
    topic: &str,
    group: &str,
    registry: &str,
    store: &Store,
) -> String {
    let ca = ca
        .map(|c| format!(", \"ssl.ca.location\" = \"{c}\""))
        .unwrap_or_default();
    format!(
        r#"
[kafka]
bootstrap_servers = "{servers}"
group_id = "{group}"
security = {{ protocol = "SASL_SSL", mechanism = "{mechanism}", username = "{user}", password = "{password}" }}
properties = {{ "topic.metadata.refresh.interval.ms" = "1000"{ca} }}

[schema_registry]
url = "{registry}"

[[sink]]
name = "orders"
topics = ["{topic}"]
table = "{url}"
storage = {opts}
partition_by = ["day(ts)"]
flush = {{ max_rows = 400, max_latency = "1s" }}
"#,
        servers = sasl_ssl(),
        url = store.url,
        opts = store.toml_options(),
    )
}

fn check(config_text: &str) -> (i32, String) {
    lakesink_check(config_text)
}

async fn consume_as(user: &str, password: &str, mechanism: &str) {
    // The user's ACLs cover topics, groups and transactional ids starting with "sasl-".
    let topic = unique("sasl-orders");
    let group = unique("sasl-g");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..600, 2).await;
    let store = Store::local("orders");
    let cfg = sasl_config(
        (user, password, mechanism),
        Some(&ca()),
        &topic,
        &group,
        &registry_url,
        &store,
    );
    let (code, out) = check(&cfg);
    assert_eq!(code, 0, "check as {user} ({mechanism}):\n{out}");
    assert!(!out.contains(password), "the password leaked: {out}");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 600, &mut proc_, Duration::from_secs(120)).await;
    let log = proc_.stop();
    assert!(!log.contains(password), "the password leaked into the log");
    assert_exactly_once(&store.read(), &produced);
}

#[tokio::test(flavor = "multi_thread")]
async fn sasl_plain_over_tls_as_on_confluent_cloud() {
    consume_as("cc-key", "cc-secret", "PLAIN").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_sha_512_over_tls_as_on_msk() {
    consume_as("msk-user", "msk-secret", "SCRAM-SHA-512").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_login_or_a_missing_acl_is_named_with_the_fix() {
    let topic = unique("sasl-orders");
    create_topic(&topic, 1).await;
    let (registry_url, _client) = registry().await;
    let store = Store::local("orders");
    let group = unique("sasl-g");
    let ca = ca();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "wrong password",
            sasl_config(
                ("cc-key", "not-the-cc-secret", "PLAIN"),
                Some(&ca),
                &topic,
                &group,
                &registry_url,
                &store,
            ),
            vec!["Invalid username or password", "kafka.security.username"],
        ),
        (
            "untrusted certificate",
            sasl_config(
                ("cc-key", "cc-secret", "PLAIN"),
                None,
                &topic,
                &group,
                &registry_url,
                &store,
            ),
            vec!["certificate verify failed", "ssl.ca.location"],
        ),
        (
            "no ACL on the topic",
            sasl_config(
                ("noacl", "noacl-secret", "PLAIN"),
                Some(&ca),
                &topic,
                &group,
                &registry_url,
                &store,
            ),
            vec![&topic, "not authorized", "Describe and Read"],
        ),
        (
            "no ACL on the group",
            sasl_config(
                ("msk-user", "msk-secret", "SCRAM-SHA-512"),
                Some(&ca),
                &topic,
                "outside-the-acls",
                &registry_url,
                &store,
            ),
            vec![
                "group `outside-the-acls`",
                "not authorized",
                "Read on the consumer group",
            ],
        ),
    ];
    // `status` names the cause too, not a bare transport failure.
    let path = scratch("logins").join("status.toml");
    std::fs::write(&path, &cases[0].1).unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["status", "--config"])
        .arg(&path)
        .env("LAKESINK_LOG", "off")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{out}");
    assert!(
        out.contains("Invalid username or password") && out.contains("kafka.security.username"),
        "{out}"
    );
    assert!(!out.contains("cc-secret"), "{out}");
    for (what, cfg, want) in cases {
        let (code, out) = check(&cfg);
        assert_eq!(code, 1, "{what}: check should fail:\n{out}");
        for w in want {
            assert!(
                out.contains(w),
                "{what}: the output does not say `{w}`:\n{out}"
            );
        }
        for secret in [
            "not-the-cc-secret",
            "cc-secret",
            "noacl-secret",
            "msk-secret",
        ] {
            assert!(!out.contains(secret), "{what}: a password leaked:\n{out}");
        }
    }
}

/// A partition the consumer is assigned but cannot read (cc-key may describe the topic, a DENY
/// ACL forbids Read; a codec the build cannot decompress looks the same to librdkafka: it logs
/// and retries forever) turns `/readyz` to 503 naming the partition, the offset and the cause,
/// shows in `lakesink_partition_stalled`, and in `status`.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_that_cannot_be_read_shows_in_readiness_metrics_and_status() {
    let topic = unique("sasl-denied-orders");
    create_topic(&topic, 1).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    produce(&topic, id, 0..50, 1).await;
    let store = Store::local("orders");
    let cfg = sasl_config(
        ("cc-key", "cc-secret", "PLAIN"),
        Some(&ca()),
        &topic,
        &unique("sasl-g"),
        &registry_url,
        &store,
    ) + "\n[pipeline]\nstall_timeout = \"6s\"\n";
    let (proc_, base) = Lakesink::start_serving(&cfg, &[]);
    let http = reqwest::Client::new();
    let start = std::time::Instant::now();
    let (code, body) = loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            let code = r.status().as_u16();
            let body = r.text().await.unwrap();
            if body.contains("stalled") {
                break (code, body);
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no stall reported; log:\n{}",
            proc_.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("partition {topic}/0 stalled at offset 0"))
            && body.to_lowercase().contains("authorization"),
        "{body}"
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "lakesink_partition_stalled{{topic=\"{topic}\",partition=\"0\"}} 1"
        )) && metrics.contains("lakesink_stalled_partitions 1"),
        "{metrics}"
    );
    let log = proc_.stop();
    assert!(
        log.contains(&format!("partition {topic}/0 cannot be consumed")),
        "the stall is logged as an error naming the partition:\n{log}"
    );

    // `status` probes every partition with lag and names the one it cannot read.
    let path = scratch("stall").join("lakesink.toml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["status", "--config"])
        .arg(&path)
        .env("LAKESINK_LOG", "error")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("cannot be read") && text.to_lowercase().contains("authorization"),
        "status:\n{text}"
    );
}

/// A dead-letter topic the principal may use but not create (cc-key has a DENY on Create for
/// `sasl-nocreate-*`): `check` fails naming the ACL, and the service does not start (exit 1,
/// the same words) instead of stopping at the first poison record.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_topic_the_principal_may_not_create_names_the_acl() {
    let topic = unique("sasl-orders");
    create_topic(&topic, 1).await;
    let (registry_url, _client) = registry().await;
    let store = Store::local("orders");
    let dlq = unique("sasl-nocreate-dlq");
    let cfg = sasl_config(
        ("cc-key", "cc-secret", "PLAIN"),
        Some(&ca()),
        &topic,
        &unique("sasl-g"),
        &registry_url,
        &store,
    ) + &format!("dead_letter_topic = \"{dlq}\"\n");
    let want = format!("grant it `Create` on topic `{dlq}`");
    let (code, out) = check(&cfg);
    assert_eq!(code, 1, "check should fail:\n{out}");
    assert!(out.contains(&want), "{out}");

    let path = scratch("logins").join("run.toml");
    std::fs::write(&path, &cfg).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_lakesink"))
        .args(["run", "--config"])
        .arg(&path)
        .env("LAKESINK_LOG", "error")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{out}");
    assert!(out.contains(&want), "{out}");
    assert!(!out.contains("cc-secret"), "the password leaked: {out}");
}

/// `sasl_config`'s login replaced by OAUTHBEARER with OIDC client credentials against the
/// test identity provider (scripts/oidc_idp.py), with a scope and Confluent Cloud's SASL
/// extensions (the broker accepts any extensions, as Confluent Cloud requires its own).
fn oidc_config(secret: &str, topic: &str, group: &str, registry: &str, store: &Store) -> String {
    let idp = need("LAKESINK_TEST_OIDC");
    let base = sasl_config(
        ("x", "x", "PLAIN"),
        Some(&ca()),
        topic,
        group,
        registry,
        store,
    );
    let security = base
        .lines()
        .find(|l| l.starts_with("security = "))
        .unwrap()
        .to_string();
    base.replace(
        &security,
        &format!(
            "security = {{ protocol = \"SASL_SSL\", mechanism = \"OAUTHBEARER\", oidc = {{ \
             token_endpoint = \"{idp}/token\", client_id = \"lakesink-oidc\", client_secret = \
             \"{secret}\", scope = \"kafka\", extensions = {{ logicalCluster = \"lkc-test\", \
             identityPoolId = \"pool-test\" }} }} }}"
        ),
    )
}

/// OAUTHBEARER with OIDC (Confluent Cloud OAuth, Event Hubs with Entra ID): librdkafka's OIDC
/// client fetches a token from the identity provider with the client credentials, the broker
/// validates it against the provider's JWKS, and the principal (the token's `sub`) consumes
/// under its ACLs, exactly once. A wrong secret fails `check` naming the cause, without the
/// secret.
#[tokio::test(flavor = "multi_thread")]
async fn oauthbearer_with_oidc_client_credentials() {
    let idp = need("LAKESINK_TEST_OIDC");
    let issued = || async {
        let stats: serde_json::Value = reqwest::get(format!("{idp}/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        stats["issued"]["lakesink-oidc"].as_u64().unwrap_or(0)
    };
    let before = issued().await;
    let topic = unique("sasl-orders");
    let group = unique("sasl-g");
    create_topic(&topic, 2).await;
    let (registry_url, client) = registry().await;
    let id = register_orders(&client, &topic).await;
    let produced = produce(&topic, id, 0..600, 2).await;
    let store = Store::local("orders");
    let cfg = oidc_config("oidc-secret", &topic, &group, &registry_url, &store);
    let (code, out) = check(&cfg);
    assert_eq!(code, 0, "check with OIDC:\n{out}");
    let mut proc_ = Lakesink::start(&cfg, &[]);
    wait_rows(&store, &topic, 600, &mut proc_, Duration::from_secs(120)).await;
    let log = proc_.stop();
    assert!(
        !log.contains("oidc-secret"),
        "the secret leaked into the log"
    );
    assert_exactly_once(&store.read(), &produced);
    assert!(
        issued().await > before,
        "no token was fetched from the provider"
    );

    let bad = oidc_config("not-the-secret", &topic, &group, &registry_url, &store);
    let (code, out) = check(&bad);
    assert_eq!(code, 1, "check with a wrong client secret:\n{out}");
    assert!(
        out.contains("OAUTHBEARER") || out.contains("token"),
        "{out}"
    );
    assert!(!out.contains("not-the-secret"), "the secret leaked: {out}");
}
