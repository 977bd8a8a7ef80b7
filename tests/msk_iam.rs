//! Amazon MSK IAM: the SigV4 token signer against vectors computed by botocore (what AWS's own
//! signer libraries use), the AWS SDK's credential chain against fake STS, container (EKS Pod
//! Identity) and instance-metadata servers, and librdkafka's token refresh with a short-lived
//! token.

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
use lakesink::aws::{self, AwsCredentials};
use lakesink::config::Secret;
use lakesink::kafka::auth::{msk_iam, AuthContext, KafkaAuth};

fn creds(token: Option<&str>) -> AwsCredentials {
    AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token: token.map(Secret::new),
        expires_at: None,
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

/// Sets the process environment to exactly `vars` among the AWS variables (and HOME), for the
/// chain built next. nextest runs every test in its own process, so this environment is the
/// test's alone.
fn aws_env(home: &std::path::Path, vars: &[(&str, String)]) {
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            std::env::remove_var(k);
        }
    }
    std::env::set_var("HOME", home);
    for (k, v) in vars {
        std::env::set_var(k, v);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sdk_credential_chain_env_profile_web_identity_pod_identity_and_imds() {
    let dir = scratch("aws");
    let home = dir.join("nohome");
    let no_imds = ("AWS_EC2_METADATA_DISABLED", "true".to_string());
    // Environment variables win.
    aws_env(
        &home,
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAENV".into()),
            ("AWS_SECRET_ACCESS_KEY", "env-secret".into()),
            ("AWS_SESSION_TOKEN", "env-token".into()),
            no_imds.clone(),
        ],
    );
    let c = aws::CredentialChain::new("eu-west-1")
        .await
        .credentials()
        .await
        .unwrap();
    assert_eq!(c.access_key_id, "AKIAENV");
    assert_eq!(c.session_token.unwrap().expose(), "env-token");

    // A named profile in the shared credentials file.
    let file = dir.join("credentials");
    std::fs::write(&file, "[default]\naws_access_key_id = AKIADEF\naws_secret_access_key = d\n\n[prod]\naws_access_key_id = AKIAPROD\naws_secret_access_key = p\n").unwrap();
    aws_env(
        &home,
        &[
            ("AWS_SHARED_CREDENTIALS_FILE", file.display().to_string()),
            ("AWS_CONFIG_FILE", dir.join("none").display().to_string()),
            ("AWS_PROFILE", "prod".into()),
            no_imds.clone(),
        ],
    );
    let c = aws::CredentialChain::new("eu-west-1")
        .await
        .credentials()
        .await
        .unwrap();
    assert_eq!(
        (c.access_key_id.as_str(), c.secret_access_key.expose()),
        ("AKIAPROD", "p")
    );

    // Fake STS (the SDK posts a form), EKS Pod Identity / ECS container credentials, and IMDS.
    let app = Router::new()
        .route(
            "/",
            axum::routing::post(|body: String| async move {
                let form: HashMap<String, String> =
                    url::form_urlencoded::parse(body.as_bytes()).into_owned().collect();
                assert_eq!(form.get("Action").map(String::as_str), Some("AssumeRoleWithWebIdentity"));
                assert_eq!(form.get("WebIdentityToken").map(String::as_str), Some("jwt-from-eks"));
                assert_eq!(form.get("RoleArn").map(String::as_str), Some("arn:aws:iam::123:role/lakesink"));
                "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                 <AssumeRoleWithWebIdentityResult><Credentials>\
                 <AccessKeyId>ASIAWEB</AccessKeyId><SecretAccessKey>web-secret</SecretAccessKey>\
                 <SessionToken>web-token</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration>\
                 </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
            }),
        )
        .route(
            "/pod-identity",
            get(|h: axum::http::HeaderMap| async move {
                assert_eq!(h.get("authorization").unwrap(), "pod-token");
                r#"{"AccessKeyId":"ASIAPOD","SecretAccessKey":"pod-secret","Token":"pod-session","Expiration":"2030-01-01T00:00:00Z"}"#
            }),
        )
        .route(
            "/latest/api/token",
            put(|| async { ([("x-aws-ec2-metadata-token-ttl-seconds", "21600")], "imds-session") }),
        )
        .route("/latest/meta-data/iam/security-credentials/", get(|| async { "node-role" }))
        .route(
            "/latest/meta-data/iam/security-credentials/node-role",
            get(|h: axum::http::HeaderMap| async move {
                assert_eq!(h.get("x-aws-ec2-metadata-token").unwrap(), "imds-session");
                r#"{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIAIMDS","SecretAccessKey":"imds-secret","Token":"imds-token","Expiration":"2030-01-01T00:00:00Z"}"#
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let jwt = dir.join("token");
    std::fs::write(&jwt, "jwt-from-eks").unwrap();
    aws_env(
        &home,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", jwt.display().to_string()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123:role/lakesink".into()),
            ("AWS_ENDPOINT_URL_STS", base.clone()),
            no_imds.clone(),
        ],
    );
    let c = aws::CredentialChain::new("eu-west-1")
        .await
        .credentials()
        .await
        .unwrap();
    assert_eq!(c.access_key_id, "ASIAWEB");
    assert_eq!(c.session_token.unwrap().expose(), "web-token");
    assert!(c.expires_at.is_some());

    // EKS Pod Identity (and ECS task roles): the container credentials endpoint.
    aws_env(
        &home,
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("{base}/pod-identity"),
            ),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "pod-token".into()),
            no_imds.clone(),
        ],
    );
    let c = aws::CredentialChain::new("eu-west-1")
        .await
        .credentials()
        .await
        .unwrap();
    assert_eq!(c.access_key_id, "ASIAPOD");

    aws_env(
        &home,
        &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", base.clone())],
    );
    let chain = aws::CredentialChain::new("eu-west-1").await;
    let c = chain.credentials().await.unwrap();
    assert_eq!(c.access_key_id, "ASIAIMDS");
    // Kept until shortly before they expire: no second walk of the chain.
    aws_env(&home, std::slice::from_ref(&no_imds));
    assert_eq!(chain.credentials().await.unwrap().access_key_id, "ASIAIMDS");

    // Nothing configured: a clear error, no secret in it.
    let e = aws::CredentialChain::new("eu-west-1")
        .await
        .credentials()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no AWS credentials"), "{e}");
    assert!(!e.to_string().contains("secret"), "{e}");
    // A failing source says why in words, not with the response it got.
    let app = Router::new().route("/latest/api/token", put(|| async { "no ttl header" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    aws_env(&home, &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", bad)]);
    let e = aws::CredentialChain::new("eu-west-1")
        .await
        .credentials()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("TTL"), "{e}");
    assert!(!e.contains("no ttl header") && !e.contains("body"), "{e}");
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
