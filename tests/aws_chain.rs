//! S3 tables without keys in `storage` sign with the AWS SDK's default credential chain, the
//! one MSK IAM uses: here the only credentials are a `credential_process` in the shared config
//! file (which object_store alone does not read), and a Parquet and a Delta sink on S3 (moto)
//! both land every record exactly once with them.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn s3_tables_sign_with_the_sdk_chain_credential_process_included() {
    let dir = scratch("aws-chain");
    // The credential process records each call, so the test sees that it was asked.
    let calls = dir.join("calls");
    let process = dir.join("credentials.sh");
    std::fs::write(
        &process,
        format!(
            "#!/bin/sh\necho called >> {}\necho '{{\"Version\": 1, \"AccessKeyId\": \"chain-key\", \
             \"SecretAccessKey\": \"chain-secret\"}}'\n",
            calls.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &process,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let aws_config = dir.join("config");
    std::fs::write(
        &aws_config,
        format!("[default]\ncredential_process = {}\n", process.display()),
    )
    .unwrap();
    let env = [
        ("AWS_CONFIG_FILE", aws_config.to_str().unwrap().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            dir.join("none").to_str().unwrap().to_string(),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    for kind in ["parquet", "delta"] {
        let mut store = Store::s3(&format!("chain_{kind}"));
        store.options.remove("access_key_id");
        store.options.remove("secret_access_key");
        let topic = unique("chain");
        create_topic(&topic, 2).await;
        let (registry_url, client) = registry().await;
        let id = register_orders(&client, &topic).await;
        let produced = produce(&topic, id, 0..400, 2).await;
        let group = unique("g");
        let cfg = config(
            &topic,
            &group,
            &registry_url,
            &store,
            &format!("kind = \"{kind}\""),
        );
        let mut proc_ = Lakesink::start(&cfg, &env);
        // Read back with keys (moto takes any): the test's own reader is not under test.
        let mut reader = store.clone();
        reader.options.insert("access_key_id".into(), "test".into());
        reader
            .options
            .insert("secret_access_key".into(), "test".into());
        if kind == "parquet" {
            wait_rows(&reader, &topic, 400, &mut proc_, Duration::from_secs(120)).await;
            proc_.stop();
            assert_exactly_once(&reader.read(), &produced);
        } else {
            let sink = reader.delta_sink(&group);
            wait_delta(
                &sink,
                &topic,
                &produced,
                &mut proc_,
                Duration::from_secs(120),
            )
            .await;
            let log = proc_.stop();
            assert!(!log.contains("chain-secret"), "a secret leaked: {log}");
            let app_ids: Vec<String> = (0..2).map(|p| format!("lakesink/{topic}/{p}")).collect();
            assert_exactly_once(&reader.read_delta(&app_ids), &produced);
        }
        let asked = std::fs::read_to_string(&calls).unwrap_or_default();
        assert!(
            asked.lines().count() >= 1,
            "{kind}: the credential process was never asked"
        );
        std::fs::remove_file(&calls).ok();
    }
}
