use super::*;

const BASE: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "g"

[schema_registry]
url = "http://127.0.0.1:8081"
basic_auth = { username = "u", password = "${SR_PASSWORD}" }

[[sink]]
name = "orders"
topics = ["shop.orders"]
table = "s3://lake/orders"
storage = { endpoint = "http://127.0.0.1:5000", secret_access_key = "${AWS_SECRET}" }
partition_by = ["day(ts)"]
flush = { max_rows = 1000, max_bytes = "8MiB", max_latency = "2s" }
"#;

fn env(k: &str) -> Option<String> {
    match k {
        "SR_PASSWORD" => Some("hunter2".into()),
        "AWS_SECRET" => Some("s3cr3t-value".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<ValidatedConfig, ConfigError> {
    Config::from_toml_with_env(text, env)?.validate()
}

#[test]
fn consumer_group_protocol_refuses_client_side_membership_keys() {
    let text = BASE.replace(
        "[kafka]\n",
        "[kafka]\nproperties = { \"group.protocol\" = \"consumer\", \"session.timeout.ms\" = \"6000\" }\n",
    );
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "kafka.properties.\"session.timeout.ms\"", "{e}");
    assert!(e.reason.contains("group.protocol"), "{e}");
    let ok = BASE.replace(
        "[kafka]\n",
        "[kafka]\nproperties = { \"group.protocol\" = \"consumer\" }\n",
    );
    parse(&ok).unwrap();
}

#[test]
fn valid_config_interpolates_and_redacts() {
    let c = parse(BASE).unwrap();
    assert_eq!(c.sinks[0].flush.max_bytes, 8 << 20);
    assert_eq!(
        c.registry
            .as_ref()
            .unwrap()
            .password
            .as_ref()
            .unwrap()
            .expose(),
        "hunter2"
    );
    assert_eq!(c.kafka_properties["enable.auto.commit"].expose(), "false");
    assert_eq!(
        c.kafka_properties["enable.auto.offset.store"].expose(),
        "false"
    );
    let shown = format!("{}\n{:?}", c.redacted(), c);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("s3cr3t-value"), "{shown}");
}

#[test]
fn unknown_key_names_the_full_path() {
    let text = BASE.replace("max_rows = 1000", "max_rowz = 1000");
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "sink[0].flush.max_rowz", "{e}");
    assert!(e.to_string().contains("unknown field"), "{e}");
    let e = parse(&format!("{BASE}\n[extra]\nx = 1\n")).unwrap_err();
    assert_eq!(e.key, "extra", "{e}");
}

#[test]
fn bad_table_url_names_the_key() {
    let e = parse(&BASE.replace("s3://lake/orders", "not a url")).unwrap_err();
    assert_eq!(e.key, "sink[0].table", "{e}");
    let e = parse(&BASE.replace("s3://lake/orders", "ftp://lake/orders")).unwrap_err();
    assert_eq!(e.key, "sink[0].table", "{e}");
    assert!(e.reason.contains("unsupported scheme"), "{e}");
}

#[test]
fn auto_commit_cannot_be_turned_on() {
    for prop in ["enable.auto.commit", "enable.auto.offset.store"] {
        let text = BASE.replace(
            "group_id = \"g\"",
            &format!("group_id = \"g\"\nproperties = {{ \"{prop}\" = true }}"),
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, format!("kafka.properties.\"{prop}\""), "{e}");
        assert!(e.reason.contains("cannot be set"), "{e}");
    }
}

#[test]
fn missing_env_var_and_bad_values_name_the_key() {
    let e = Config::from_toml_with_env(BASE, |_| None).unwrap_err();
    assert_eq!(e.key, "schema_registry.basic_auth.password", "{e}");
    assert!(e.reason.contains("SR_PASSWORD"), "{e}");
    let e = parse(&BASE.replace("\"2s\"", "\"soon\"")).unwrap_err();
    assert_eq!(e.key, "sink[0].flush.max_latency", "{e}");
    let e = parse(&BASE.replace("day(ts)", "month(ts)")).unwrap_err();
    assert_eq!(e.key, "sink[0].partition_by", "{e}");
    let e = parse(&BASE.replace("topics = [\"shop.orders\"]", "")).unwrap_err();
    assert_eq!(e.key, "sink[0].topics", "{e}");
}

#[test]
fn dollar_escapes() {
    assert_eq!(interpolate_str("a$${b}c$d", &env).unwrap(), "a${b}c$d");
    assert_eq!(interpolate_str("${NOPE:-x}", &env).unwrap(), "x");
    assert_eq!(
        interpolate_str("$ConnectionString", &env).unwrap(),
        "$ConnectionString"
    );
}

#[test]
fn parquet_compaction_settings_are_checked() {
    let with = |section: &str| {
        parse(&BASE.replace(
            "partition_by = [\"day(ts)\"]",
            &format!("partition_by = [\"day(ts)\"]\nparquet = {{ {section} }}"),
        ))
    };
    let c = with("auto_compact = true, compact_min_files = 8, target_file_size = \"64MiB\", compact_min_age = \"30s\"").unwrap();
    let p = &c.sinks[0].parquet;
    assert!(p.auto_compact);
    assert_eq!(p.compact.min_files, 8);
    assert_eq!(p.compact.target_file_size, 64 << 20);
    assert_eq!(p.compact.min_age.as_secs(), 30);
    let defaults = parse(BASE).unwrap();
    assert!(!defaults.sinks[0].parquet.auto_compact);
    assert_eq!(defaults.sinks[0].parquet.compact.min_age.as_secs(), 60);
    let e = with("compact_min_files = 1").unwrap_err();
    assert_eq!(e.key, "sink[0].parquet.compact_min_files", "{e}");
    let e = with("compact_min_age = \"100ms\"").unwrap_err();
    assert_eq!(e.key, "sink[0].parquet.compact_min_age", "{e}");
    assert!(e.reason.contains("floor of 1s"), "{e}");
    let e = with("target_file_size = \"big\"").unwrap_err();
    assert_eq!(e.key, "sink[0].parquet.target_file_size", "{e}");
    let e = with("auto_compacting = true").unwrap_err();
    assert!(e.to_string().contains("auto_compacting"), "{e}");
}

#[test]
fn delta_and_upsert_settings_are_checked() {
    let delta = BASE.replace(
        "partition_by = [\"day(ts)\"]",
        "partition_by = [\"day(ts)\"]\nkind = \"delta\"\nmode = \"upsert\"\nkey = [\"id\"]\ndelta = { checkpoint_interval = 3, vacuum_retention = \"24h\" }",
    );
    let c = parse(&delta).unwrap();
    assert_eq!(c.sinks[0].kind, SinkKind::Delta);
    assert_eq!(c.sinks[0].upsert_keys, Some(vec!["id".to_string()]));
    assert_eq!(c.sinks[0].delta.checkpoint_interval, 3);
    assert_eq!(c.sinks[0].delta.vacuum_retention.as_secs(), 86_400);
    assert_eq!(c.sinks[0].delta.profile, sinks::delta::ReaderProfile::Delta);
    let fabric = parse(&delta.replace(
        "checkpoint_interval = 3",
        "checkpoint_interval = 3, profile = \"fabric\"",
    ))
    .unwrap();
    assert_eq!(
        fabric.sinks[0].delta.profile,
        sinks::delta::ReaderProfile::Fabric
    );
    let e = parse(&delta.replace(
        "checkpoint_interval = 3",
        "checkpoint_interval = 3, profile = \"excel\"",
    ))
    .unwrap_err();
    assert_eq!(e.key, "sink[0].delta.profile", "{e}");
    // Row groups: the profile's unless asked for; too small is refused, naming the key.
    let groups = parse(&delta.replace(
        "checkpoint_interval = 3",
        "checkpoint_interval = 3, profile = \"fabric\", row_group_rows = 262144",
    ))
    .unwrap();
    let applied = groups.sinks[0]
        .delta
        .apply(sinks::delta::DeltaSinkConfig::default());
    assert_eq!(applied.row_groups.rows, 262_144);
    assert_eq!(
        applied.row_groups.bytes, None,
        "fabric: rows alone bound a group"
    );
    let applied = fabric.sinks[0]
        .delta
        .apply(sinks::delta::DeltaSinkConfig::default());
    assert_eq!(applied.row_groups.rows, 8 << 20);
    let applied = parse(&delta).unwrap().sinks[0]
        .delta
        .apply(sinks::delta::DeltaSinkConfig::default());
    assert_eq!(applied.row_groups, sinks::encode::RowGroups::default());
    assert_eq!(applied.row_groups.bytes, Some(16 << 20));
    let bytes = parse(&delta.replace(
        "checkpoint_interval = 3",
        "checkpoint_interval = 3, profile = \"fabric\", row_group_bytes = \"64MiB\"",
    ))
    .unwrap();
    let applied = bytes.sinks[0]
        .delta
        .apply(sinks::delta::DeltaSinkConfig::default());
    assert_eq!(applied.row_groups.bytes, Some(64 << 20));
    let e = parse(&delta.replace(
        "checkpoint_interval = 3",
        "checkpoint_interval = 3, row_group_bytes = \"64KiB\"",
    ))
    .unwrap_err();
    assert_eq!(e.key, "sink[0].delta.row_group_bytes", "{e}");
    let e = parse(&delta.replace(
        "checkpoint_interval = 3",
        "checkpoint_interval = 3, row_group_rows = 100",
    ))
    .unwrap_err();
    assert_eq!(e.key, "sink[0].delta.row_group_rows", "{e}");
    let e = parse(&delta.replace("vacuum_retention = \"24h\"", "vacuum_retention = \"10m\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("delta.vacuum_retention") && e.contains("floor of 1h"),
        "a retention that could delete files being committed is refused: {e}"
    );

    let no_key = delta.replace("key = [\"id\"]\n", "");
    assert!(parse(&no_key)
        .unwrap_err()
        .to_string()
        .contains("sink[0].key"));
    // Keyed by the message key: Debezium's key, read as its value is.
    let from_key = |format: &str| {
        parse(&no_key.replace(
            "kind = \"delta\"\n",
            &format!("kind = \"delta\"\n{format}\n"),
        ))
    };
    let c = from_key("format = \"debezium-json\"\njson_envelope = \"connect\"").unwrap();
    assert_eq!(c.sinks[0].upsert_keys, Some(vec![]));
    assert!(c.sinks[0].keys_from_message);
    assert!(matches!(
        c.sinks[0].key_format,
        Some(KeyFormat::ConnectJson)
    ));
    let c = from_key("format = \"debezium-avro\"").unwrap();
    assert!(matches!(c.sinks[0].key_format, Some(KeyFormat::Avro)));
    let c = from_key("format = \"avro\"\nkey_format = \"string\"").unwrap();
    assert!(c.sinks[0].keys_from_message);
    assert!(matches!(c.sinks[0].key_format, Some(KeyFormat::String)));
    let e = from_key("format = \"avro\"").unwrap_err().to_string();
    assert!(e.contains("sink[0].key") && e.contains("key_format"), "{e}");
    assert!(!parse(&delta).unwrap().sinks[0].keys_from_message);
    let parquet_upsert = no_key.replace("kind = \"delta\"\n", "");
    let e = parse(&parquet_upsert).unwrap_err().to_string();
    assert!(e.contains("sink[0].mode") && e.contains("delta"), "{e}");
    let zero = delta.replace("checkpoint_interval = 3", "checkpoint_interval = 0");
    assert!(parse(&zero)
        .unwrap_err()
        .to_string()
        .contains("sink[0].delta.checkpoint_interval"));
}

#[test]
fn databend_connection_is_parsed_without_leaking_the_password() {
    let text = BASE
        .replace("table = \"s3://lake/orders\"", "table = \"{table}\"")
        .replace(
            "partition_by = [\"day(ts)\"]",
            "kind = \"databend\"\ndatabend = { url = \"https://loader:${AWS_SECRET}@db.example.com:8000/analytics\", warehouse = \"wh\" }",
        );
    let c = parse(&text).unwrap();
    let d = c.sinks[0].databend.as_ref().unwrap();
    assert_eq!(d.endpoint.as_str(), "https://db.example.com:8000/");
    assert_eq!(d.user, "loader");
    assert_eq!(d.password.as_deref(), Some("s3cr3t-value"));
    assert_eq!(d.database, "analytics");
    assert!(!format!("{c:?}").contains("s3cr3t-value"));
    let missing = text.replace(
        "databend = { url = \"https://loader:${AWS_SECRET}@db.example.com:8000/analytics\", warehouse = \"wh\" }",
        "",
    );
    assert!(parse(&missing)
        .unwrap_err()
        .to_string()
        .contains("sink[0].databend"));
}

#[test]
fn an_unknown_choice_names_its_key_and_the_choices() {
    for (line, key, choices) in [
        (
            "format = \"xml\"",
            "sink[0].format",
            "`avro`, `debezium-avro`",
        ),
        (
            "kind = \"iceberg\"",
            "sink[0].kind",
            "`parquet`, `delta`, `databend`",
        ),
        ("mode = \"merge\"", "sink[0].mode", "`append` or `upsert`"),
        (
            "errors = \"ignore\"",
            "sink[0].errors",
            "`fail`, `skip`, `dead-letter`",
        ),
        (
            "key_format = \"bytes\"",
            "sink[0].key_format",
            "`string`, `json`, `avro`",
        ),
        (
            "json_envelope = \"cloudevents\"",
            "sink[0].json_envelope",
            "`none` or `connect`",
        ),
    ] {
        let text = BASE.replace(
            "name = \"orders\"\n",
            &format!("name = \"orders\"\n{line}\n"),
        );
        let e = parse(&text).unwrap_err();
        assert_eq!(e.key, key, "{e}");
        assert!(e.reason.contains("unknown variant"), "{e}");
        assert!(e.reason.contains(choices), "{e}");
    }
    let text = BASE.replace(
        "name = \"orders\"\n",
        "name = \"orders\"\nformat = \"json\"\njson_envelope = \"connect\"\nkind = \"delta\"\n",
    );
    let v = parse(&text).unwrap();
    assert_eq!(v.sinks[0].format, Format::Json);
    assert_eq!(v.sinks[0].kind, SinkKind::Delta);
    assert!(v.sinks[0].connect_envelope);
}

#[test]
fn per_topic_table_templates_are_checked() {
    let regex = |table: &str, extra: &str| {
        BASE.replace(
            "topics = [\"shop.orders\"]",
            "topics_regex = \"shop\\\\..*\"",
        )
        .replace(
            "table = \"s3://lake/orders\"",
            &format!("table = \"{table}\"{extra}"),
        )
    };
    let e = parse(&regex("s3://lake/orders", "")).unwrap_err();
    assert_eq!(e.key, "sink[0].table", "{e}");
    assert!(
        e.reason
            .contains("every topic it matches into this one table"),
        "{e}"
    );
    parse(&regex("s3://lake/orders", "\nshared_table = true")).unwrap();
    parse(&regex("s3://lake/cdc/{db}/{table}", "")).unwrap();
    let e = parse(&regex("s3://lake/{topic}", "\nshared_table = true")).unwrap_err();
    assert_eq!(e.key, "sink[0].shared_table", "{e}");
    let e = parse(&regex("s3://lake/{schema}", "")).unwrap_err();
    assert_eq!(e.key, "sink[0].table", "{e}");
    assert!(e.reason.contains("unknown placeholder `{schema}`"), "{e}");

    // Debezium's own topics are skipped by rule, not quarantined for want of a table name.
    let dbz = |table: &str| {
        let text = regex(table, "\nformat = \"debezium-avro\"").replace("shop\\\\..*", ".*");
        parse(&text).unwrap().sinks[0].topics.clone()
    };
    let t = dbz("s3://lake/cdc/{db}/{table}");
    for (topic, read) in [
        ("shop.public.orders", true),
        ("shop", false),
        ("shop.transaction", false),
        ("__debezium-heartbeat.shop", false),
    ] {
        assert_eq!(t.matches(topic), read, "{topic}");
        assert_eq!(t.skipped_by_rule(topic).is_some(), !read, "{topic}");
    }
    let t = dbz("s3://lake/{topic}");
    assert!(t.matches("shop.transaction") && !t.matches("__debezium-heartbeat.shop"));
    assert!(parse(&regex("s3://lake/{topic}", "")).unwrap().sinks[0]
        .topics
        .skipped_by_rule("__debezium-heartbeat.shop")
        .is_none());
}

#[test]
fn per_table_settings_are_checked() {
    let with = |extra: &str| {
        BASE.replace(
            "table = \"s3://lake/orders\"",
            "table = \"s3://lake/{topic}\"\nmode = \"upsert\"\nkind = \"delta\"\nkey = [\"id\"]",
        ) + extra
    };
    let v = parse(&with(
        "\n[sink.tables.\"shop.orders\"]\ntable = \"s3://lake/sales/orders\"\npartition_by = []\nkey = [\"order_id\", \"line\"]\n",
    ))
    .unwrap();
    let s = &v.sinks[0];
    let t = s.for_topic("shop.orders");
    assert!(t.partition_by.is_empty());
    assert_eq!(
        t.upsert_keys.as_deref(),
        Some(&["order_id".to_string(), "line".to_string()][..])
    );
    assert_eq!(
        s.fixed_tables(),
        [(
            "shop.orders".to_string(),
            "s3://lake/sales/orders".to_string()
        )]
    );
    let e = parse(&with("\n[sink.tables.\"shop.other\"]\nkey = [\"id\"]\n")).unwrap_err();
    assert_eq!(e.key, "sink[0].tables.\"shop.other\"", "{e}");
    let e = parse(&with(
        "\n[sink.tables.\"shop.orders\"]\ntable = \"ftp://x/y\"\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "sink[0].tables.\"shop.orders\".table", "{e}");
    let e = parse(&with(
        "\n[sink.tables.\"shop.orders\"]\npartition_by = [\"week(ts)\"]\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "sink[0].tables.\"shop.orders\".partition_by", "{e}");
    // A Databend sink renames a table or names its key; it partitions nothing.
    let databend = |extra: &str| {
        BASE.replace(
            "table = \"s3://lake/orders\"",
            "table = \"{table}\"\nmode = \"upsert\"\nkind = \"databend\"\n\
             databend = { url = \"http://127.0.0.1:8000/db\" }\nformat = \"debezium-avro\"",
        )
        .replace("partition_by = [\"day(ts)\"]\n", "")
            + extra
    };
    let v = parse(&databend(
        "\n[sink.tables.\"shop.orders\"]\ntable = \"sales_orders\"\nkey = [\"order_id\"]\n",
    ))
    .unwrap();
    assert!(v.sinks[0].keys_from_message);
    let t = &v.sinks[0].tables["shop.orders"];
    assert_eq!(t.table.as_deref(), Some("sales_orders"));
    assert_eq!(
        t.upsert_keys.as_deref(),
        Some(&["order_id".to_string()][..])
    );
    let e = parse(&databend(
        "\n[sink.tables.\"shop.orders\"]\npartition_by = [\"day(ts)\"]\n",
    ))
    .unwrap_err();
    assert_eq!(e.key, "sink[0].tables.\"shop.orders\".partition_by", "{e}");
    let e = parse(&with("\n[sink.tables.\"shop.orders\"]\nkeys = [\"id\"]\n")).unwrap_err();
    assert!(e.key.contains("keys"), "an unknown key is named: {e}");
    // Without a per-topic template there is nothing to set per table.
    let text = BASE.to_string() + "\n[sink.tables.\"shop.orders\"]\npartition_by = []\n";
    let e = parse(&text).unwrap_err();
    assert_eq!(e.key, "sink[0].tables", "{e}");
}

#[test]
fn the_readme_database_cdc_config_is_valid() {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("## Database CDC").expect("the section")..];
    let start = section.find("```toml\n").expect("its config") + "```toml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    let c = Config::from_toml_with_env(text, |_| Some("secret".into()))
        .and_then(|c| c.validate())
        .unwrap_or_else(|e| panic!("README's Database CDC config: {e}"));
    assert_eq!(c.sinks.len(), 2);
    assert!(c.sinks.iter().all(|s| s.keys_from_message));
}

#[test]
fn oauthbearer_needs_a_token_source() {
    let with = |kafka: &str| {
        BASE.replace(
            "group_id = \"g\"\n",
            &format!("group_id = \"g\"\n{kafka}\n"),
        )
    };
    // No token source: it would start and then fail every login.
    let e = parse(&with(
        "security = { protocol = \"SASL_SSL\", mechanism = \"OAUTHBEARER\" }",
    ))
    .unwrap_err();
    assert_eq!(e.key, "kafka.security.oidc", "{e}");
    assert!(e.reason.contains("token_endpoint"), "{e}");
    let e = parse(&with(
        "properties = { \"sasl.mechanism\" = \"OAUTHBEARER\" }",
    ))
    .unwrap_err();
    assert_eq!(e.key, "kafka.security.oidc", "{e}");
    // OIDC client credentials become librdkafka's OIDC settings; the secret stays secret.
    let c = parse(&with(
        "security = { protocol = \"SASL_SSL\", mechanism = \"OAUTHBEARER\", oidc = { \
         token_endpoint = \"https://idp.example/oauth2/token\", client_id = \"lakesink\", \
         client_secret = \"s3cr3t\", scope = \"kafka\", extensions = { logicalCluster = \
         \"lkc-1\", identityPoolId = \"pool-2\" } } }",
    ))
    .unwrap();
    let get = |k: &str| c.kafka_properties.get(k).map(|v| v.expose().to_string());
    assert_eq!(get("sasl.mechanism").as_deref(), Some("OAUTHBEARER"));
    assert_eq!(get("sasl.oauthbearer.method").as_deref(), Some("oidc"));
    assert_eq!(
        get("sasl.oauthbearer.client.secret").as_deref(),
        Some("s3cr3t")
    );
    assert_eq!(
        get("sasl.oauthbearer.extensions").as_deref(),
        Some("identityPoolId=pool-2,logicalCluster=lkc-1")
    );
    assert!(!c.redacted().contains("s3cr3t"), "{}", c.redacted());
    // Raw librdkafka OIDC properties are a token source too.
    parse(&with(
        "properties = { \"sasl.mechanism\" = \"OAUTHBEARER\", \"sasl.oauthbearer.method\" = \"oidc\" }",
    ))
    .unwrap();
    let e = parse(&with(
        "security = { protocol = \"SASL_SSL\", mechanism = \"OAUTHBEARER\", oidc = { \
         token_endpoint = \"idp/token\", client_id = \"c\", client_secret = \"s\" } }",
    ))
    .unwrap_err();
    assert_eq!(e.key, "kafka.security.oidc.token_endpoint", "{e}");
    parse(&with(
        "security = { protocol = \"SASL_SSL\", mechanism = \"AWS_MSK_IAM\", region = \"eu-west-1\" }",
    ))
    .unwrap();
}

#[test]
fn every_managed_kafka_login_in_the_readme_is_valid() {
    let readme = include_str!("../../README.md");
    let at = readme
        .find("# Confluent Cloud: API key and secret.")
        .expect("the managed Kafka examples");
    let block = &readme[at..at + readme[at..].find("```").unwrap()];
    let logins: Vec<&str> = block.split("\n[kafka]\n").skip(1).collect();
    assert!(logins.len() >= 6, "{logins:?}");
    for login in logins {
        let kafka: String = login
            .lines()
            .take_while(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let text = BASE.replace(
            "[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\n",
            &format!("[kafka]\n{kafka}\n"),
        );
        Config::from_toml_with_env(&text, |_| Some("secret".into()))
            .and_then(|c| c.validate())
            .unwrap_or_else(|e| panic!("README's login\n{kafka}\n: {e}"));
    }
}
