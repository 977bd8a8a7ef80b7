//! Amazon MSK IAM: the SigV4 token signer against vectors computed by botocore (what AWS's own
//! signer libraries use), the AWS credential chain against fake STS and instance-metadata
//! servers, and librdkafka's token refresh with a short-lived token.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::routing::{get, put};
use axum::Router;
use base64::Engine;
use chrono::{TimeZone, Utc};
use common::*;
use lakesink::config::Secret;
use lakesink::kafka::auth::aws::{self, AwsCredentials, Env};
use lakesink::kafka::auth::{msk_iam, AuthContext, KafkaAuth};

struct MapEnv(HashMap<&'static str, String>);

impl Env for MapEnv {
    fn var(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
}

fn creds(token: Option<&str>) -> AwsCredentials {
    AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token: token.map(Secret::new),
        expires_at: None,
        source: "test",
    }
}

fn botocore(region: &str, c: &AwsCredentials, epoch: i64) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(py_script("sigv4_vector.py")).args([
        region,
        &c.access_key_id,
        c.secret_access_key.expose(),
        &epoch.to_string(),
    ]);
    if let Some(t) = &c.session_token {
        cmd.arg(t.expose());
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn signer_matches_botocore_byte_for_byte() {
    for (region, epoch, token) in [
        ("eu-west-1", 1_795_262_400i64, None),
        (
            "us-east-1",
            1_700_000_123,
            Some("FwoGZXIvYXdzEJr//////////wEaD+/token="),
        ),
    ] {
        let c = creds(token);
        let ours = msk_iam::presigned_url(region, &c, Utc.timestamp_opt(epoch, 0).unwrap());
        assert_eq!(ours, botocore(region, &c, epoch), "region {region}");
    }
}

#[test]
fn token_is_unpadded_base64url_of_the_url_with_a_user_agent() {
    let now = Utc.timestamp_opt(1_795_262_400, 0).unwrap();
    let t = msk_iam::token("eu-west-1", &creds(None), now);
    assert!(!t.token.contains('=') && !t.token.contains('+') && !t.token.contains('/'));
    let url = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&t.token)
            .unwrap(),
    )
    .unwrap();
    assert!(
        url.starts_with("https://kafka.eu-west-1.amazonaws.com/?Action=kafka-cluster%3AConnect&"),
        "{url}"
    );
    assert!(url.contains("&User-Agent=lakesink%2F"), "{url}");
    assert_eq!(t.expires_at_ms, now.timestamp_millis() + 900_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn credential_chain_env_profile_web_identity_and_imds() {
    let dir = scratch("aws");
    // Environment variables win.
    let env = MapEnv(HashMap::from([
        ("AWS_ACCESS_KEY_ID", "AKIAENV".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "env-secret".to_string()),
        ("AWS_SESSION_TOKEN", "env-token".to_string()),
    ]));
    let c = aws::resolve(&env, "eu-west-1").await.unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.source),
        ("AKIAENV", "environment")
    );
    assert_eq!(c.session_token.unwrap().expose(), "env-token");

    // A named profile in the shared credentials file.
    let file = dir.join("credentials");
    std::fs::write(&file, "[default]\naws_access_key_id = AKIADEF\naws_secret_access_key = d\n\n[prod]\naws_access_key_id = AKIAPROD\naws_secret_access_key = p\n").unwrap();
    let env = MapEnv(HashMap::from([
        ("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string()),
        ("AWS_PROFILE", "prod".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]));
    let c = aws::resolve(&env, "eu-west-1").await.unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.expose()),
        ("AKIAPROD", "p")
    );

    // Fake STS and IMDS.
    let app = Router::new()
        .route(
            "/",
            get(|q: axum::extract::Query<HashMap<String, String>>| async move {
                assert_eq!(q.get("Action").map(String::as_str), Some("AssumeRoleWithWebIdentity"));
                assert_eq!(q.get("WebIdentityToken").map(String::as_str), Some("jwt-from-eks"));
                assert_eq!(q.get("RoleArn").map(String::as_str), Some("arn:aws:iam::123:role/lakesink"));
                "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
                 <AccessKeyId>ASIAWEB</AccessKeyId><SecretAccessKey>web-secret</SecretAccessKey>\
                 <SessionToken>web-token</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration>\
                 </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
            }),
        )
        .route("/latest/api/token", put(|| async { "imds-session" }))
        .route("/latest/meta-data/iam/security-credentials/", get(|| async { "node-role\n" }))
        .route(
            "/latest/meta-data/iam/security-credentials/node-role",
            get(|h: axum::http::HeaderMap| async move {
                assert_eq!(h.get("x-aws-ec2-metadata-token").unwrap(), "imds-session");
                r#"{"AccessKeyId":"ASIAIMDS","SecretAccessKey":"imds-secret","Token":"imds-token","Expiration":"2030-01-01T00:00:00Z"}"#
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let jwt = dir.join("token");
    std::fs::write(&jwt, "jwt-from-eks\n").unwrap();
    let env = MapEnv(HashMap::from([
        ("AWS_WEB_IDENTITY_TOKEN_FILE", jwt.display().to_string()),
        ("AWS_ROLE_ARN", "arn:aws:iam::123:role/lakesink".to_string()),
        ("AWS_ENDPOINT_URL_STS", base.clone()),
    ]));
    let c = aws::resolve(&env, "eu-west-1").await.unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.source),
        ("ASIAWEB", "web identity")
    );
    assert_eq!(c.session_token.unwrap().expose(), "web-token");
    assert!(c.expires_at.is_some());

    let env = MapEnv(HashMap::from([
        ("HOME", dir.join("nohome").display().to_string()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", base.clone()),
    ]));
    let c = aws::resolve(&env, "eu-west-1").await.unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.source),
        ("ASIAIMDS", "instance metadata")
    );

    // Nothing configured: a clear error, no secret in it.
    let env = MapEnv(HashMap::from([
        ("HOME", dir.join("nohome").display().to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]));
    let e = aws::resolve(&env, "eu-west-1").await.unwrap_err();
    assert!(e.to_string().contains("no AWS credentials"), "{e}");
}

/// librdkafka asks for a new token before the announced lifetime ends, from the poll loop;
/// lakesink's consumers poll continuously, so a short-lived token is refreshed again and again
/// while the consumer is idle.
#[test]
fn tokens_are_refreshed_before_they_expire() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    // Credentials for the signer come from the environment of this test process.
    std::env::set_var("AWS_ACCESS_KEY_ID", "AKIATEST");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret");
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let auth = KafkaAuth {
        msk_iam_region: Some("eu-west-1".into()),
        lifetime: Some(Duration::from_millis(1500)),
        ..Default::default()
    };
    let consumer: BaseConsumer<AuthContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .set("group.id", "msk-iam-refresh")
        .set("security.protocol", "SASL_PLAINTEXT")
        .set("sasl.mechanism", "OAUTHBEARER")
        .create_with_context(AuthContext(auth.clone()))
        .unwrap();
    consumer.subscribe(&["idle-topic"]).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    let n = auth.tokens.load(Ordering::Relaxed);
    // One at start, then one every ~1.2 s (80 % of 1.5 s) over 5 s.
    assert!(
        (3..=8).contains(&n),
        "{n} tokens in 5 s with a 1.5 s lifetime"
    );
}

/// The bundled librdkafka is built with TLS and every SASL mechanism managed services use: the
/// configurations documented for Confluent Cloud, Event Hubs and MSK create clients.
#[test]
fn managed_kafka_configurations_create_clients() {
    use rdkafka::consumer::BaseConsumer;
    for (mechanism, extra) in [
        ("PLAIN", vec![]),         // Confluent Cloud, Azure Event Hubs
        ("SCRAM-SHA-512", vec![]), // MSK SCRAM
        ("OAUTHBEARER", vec![]),   // MSK IAM (token from lakesink's signer)
        (
            "PLAIN",
            vec![("ssl.endpoint.identification.algorithm", "https")],
        ),
    ] {
        let mut c = rdkafka::ClientConfig::new();
        c.set(
            "bootstrap.servers",
            "b-1.example.kafka.eu-west-1.amazonaws.com:9096",
        )
        .set("group.id", "g")
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", mechanism)
        .set("sasl.username", "u")
        .set("sasl.password", "p");
        for (k, v) in extra {
            c.set(k, v);
        }
        let r: Result<BaseConsumer<AuthContext>, _> =
            c.create_with_context(AuthContext(KafkaAuth::default()));
        assert!(r.is_ok(), "{mechanism}: {:?}", r.err());
    }
    // Hostname verification is on unless turned off explicitly.
    let defaults = rdkafka::ClientConfig::new();
    assert!(defaults
        .get("ssl.endpoint.identification.algorithm")
        .is_none());
}
