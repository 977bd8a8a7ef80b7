//! Golden tests on published connector configs (`tests/data/connect/`): each translates to the
//! TOML beside it (`LAKESINK_BLESS=1` rewrites them), copies no secret, and passes config
//! validation with the variables it names set.

use super::translate;

const SECRETS: &[&str] = &[
    "wJalrXUtnFEMI",
    "AKIAIOSFODNN7EXAMPLE",
    "SRSECRETEXAMPLE",
    "client-secret-example",
    "account-key-example",
    "password = \"databend\"",
];

fn golden(name: &str) {
    let dir = data_dir();
    let input = std::fs::read_to_string(dir.join(name)).unwrap();
    let draft = translate(&input, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let toml = draft.render();
    for s in SECRETS {
        assert!(!toml.contains(s), "{name}: a secret was copied:\n{toml}");
    }
    let expected_path = dir.join(format!("{name}.toml"));
    if std::env::var_os("LAKESINK_BLESS").is_some() {
        std::fs::write(&expected_path, &toml).unwrap();
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(
        toml, expected,
        "{name}: the translation changed (LAKESINK_BLESS=1 to accept)"
    );
    // What the input cannot give is filled in as the output says.
    let toml = toml.replace("\n# schema = {", "\nschema = {");
    for (var, _) in &draft.env {
        std::env::set_var(var, "https://example.test/value");
    }
    std::env::set_var("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092");
    let checked = crate::config::Config::from_toml(&toml).and_then(|c| c.validate());
    if let Err(e) = checked {
        panic!("{name}: the output does not validate: {e}\n{toml}");
    }
}

pub(super) fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/connect")
}

#[test]
fn s3_quickstart() {
    golden("s3-quickstart.properties");
}

#[test]
fn s3_parquet_hourly_with_dead_letters_and_registry() {
    golden("s3-parquet-hourly.json");
}

#[test]
fn gcs_quickstart() {
    golden("gcs-quickstart.properties");
}

#[test]
fn adls_gen2_with_a_service_principal() {
    golden("adls-gen2.json");
}

#[test]
fn s3_with_protobuf_values() {
    golden("s3-protobuf.properties");
}

#[test]
fn adls_gen2_on_confluent_cloud() {
    golden("adls-gen2-cloud.json");
}

#[test]
fn databend_upserts() {
    golden("databend.properties");
}

#[test]
fn kafka_delta_ingest_command_line() {
    golden("kafka-delta-ingest.sh");
}

#[test]
fn an_unknown_connector_is_refused_naming_those_read() {
    let e = translate(
        r#"{"connector.class": "io.confluent.connect.jdbc.JdbcSinkConnector", "topics": "t"}"#,
        "jdbc.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("JdbcSinkConnector") && e.contains("S3SinkConnector"),
        "{e}"
    );
}
