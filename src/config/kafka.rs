//! Checking `[kafka]` and `[schema_registry]`: the librdkafka properties (the safety settings
//! lakesink owns, logins, what KIP-848's protocol takes from the broker, where a sink without a
//! position starts) and the registry's URL, login and TLS files.

use super::*;

/// librdkafka properties lakesink owns; setting them is an error.
const FORCED: &[(&str, &str, &str)] = &[
    (
        "enable.auto.commit",
        "false",
        "lakesink commits offsets itself, after the sink's commit; auto commit would lose records on a crash",
    ),
    (
        "enable.auto.offset.store",
        "false",
        "lakesink stores offsets itself, after the sink's commit",
    ),
];

/// Why OAUTHBEARER without a token source is refused (see the README's managed Kafka table).
const NO_TOKEN_SOURCE: &str = "OAUTHBEARER needs a token source: an OIDC provider \
     (security.oidc = { token_endpoint, client_id, client_secret, scope, extensions }: Confluent \
     Cloud OAuth, Microsoft Entra ID for Event Hubs), or mechanism = \"AWS_MSK_IAM\" for MSK";

/// Whether librdkafka knows property `name` and takes `value` for it (as it checks each one
/// when a client is created): a typo fails at start-up naming the key, not as a runtime error.
/// librdkafka's message is passed on except for values that may be secrets.
fn librdkafka_accepts(name: &str, value: &str) -> Result<(), String> {
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaConfRes;
    match rdkafka::ClientConfig::new()
        .set(name, value)
        .create_native_config()
    {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => {
            Err("librdkafka has no such property; see the list in \
             https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md"
                .into())
        }
        Err(KafkaError::ClientConfig(_, _, _, _)) if is_secret_key(name) => {
            Err("librdkafka refuses this value".into())
        }
        Err(KafkaError::ClientConfig(_, desc, _, _)) => {
            Err(format!("librdkafka refuses it: {desc}"))
        }
        Err(_) => Err("librdkafka refuses it".into()),
    }
}

/// librdkafka's OIDC client settings for `security.oidc`.
fn oidc_properties(
    oidc: &OidcConfig,
    props: &mut BTreeMap<String, Secret>,
) -> Result<(), ConfigError> {
    let url = url::Url::parse(&oidc.token_endpoint).map_err(|e| {
        err(
            "kafka.security.oidc.token_endpoint",
            format!(
                "`{}` is not a URL ({e})",
                sinks::store::redact_url(&oidc.token_endpoint)
            ),
        )
    })?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(err(
            "kafka.security.oidc.token_endpoint",
            "must be an https:// URL",
        ));
    }
    if oidc.client_id.trim().is_empty() {
        return Err(err("kafka.security.oidc.client_id", "must not be empty"));
    }
    for (k, v) in &oidc.extensions {
        let bad = |c: char| c == ',' || c == '=';
        if k.is_empty() || k.contains(bad) || v.contains(bad) {
            return Err(err(
                format!("kafka.security.oidc.extensions.{k}"),
                "names and values may not be empty or contain `,` or `=`",
            ));
        }
    }
    let mut set = |k: &str, v: Secret| {
        props.insert(k.to_string(), v);
    };
    set("sasl.oauthbearer.method", Secret::new("oidc"));
    set(
        "sasl.oauthbearer.token.endpoint.url",
        Secret::new(oidc.token_endpoint.clone()),
    );
    set(
        "sasl.oauthbearer.client.id",
        Secret::new(oidc.client_id.clone()),
    );
    set("sasl.oauthbearer.client.secret", oidc.client_secret.clone());
    if let Some(scope) = &oidc.scope {
        set("sasl.oauthbearer.scope", Secret::new(scope.clone()));
    }
    if !oidc.extensions.is_empty() {
        let ext: Vec<String> = oidc
            .extensions
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        set("sasl.oauthbearer.extensions", Secret::new(ext.join(",")));
    }
    Ok(())
}

/// `[kafka]`: every librdkafka property lakesink sets (safety settings included), and the
/// region MSK IAM tokens are signed for when that login is used.
pub(super) fn validate_kafka(
    k: &KafkaConfig,
) -> Result<(BTreeMap<String, Secret>, Option<String>), ConfigError> {
    if k.bootstrap_servers.trim().is_empty() {
        return Err(err("kafka.bootstrap_servers", "must not be empty"));
    }
    if k.group_id.trim().is_empty() {
        return Err(err("kafka.group_id", "must not be empty"));
    }
    let mut props: BTreeMap<String, Secret> = BTreeMap::new();
    let mut msk_iam_region = None;
    for (name, value) in &k.properties {
        let key = format!("kafka.properties.\"{name}\"");
        if let Some((_, _, why)) = FORCED.iter().find(|(n, _, _)| n == name) {
            return Err(err(
                key,
                format!("cannot be set: {why}; remove it (lakesink forces it to false)"),
            ));
        }
        match name.as_str() {
            "bootstrap.servers" => return Err(err(key, "set `kafka.bootstrap_servers` instead")),
            "group.id" => return Err(err(key, "set `kafka.group_id` instead")),
            _ => {}
        }
        let value = value.to_string();
        librdkafka_accepts(name, &value).map_err(|why| err(key, why))?;
        props.insert(name.clone(), Secret::new(value));
    }
    // KIP-848's protocol takes membership timing from the broker; librdkafka refuses these.
    let kip848 = k
        .properties
        .get("group.protocol")
        .map(|v| v.to_string().to_ascii_lowercase())
        == Some("consumer".into());
    // Classic groups: `roundrobin` spreads the partitions of every subscribed topic over the
    // members as one list. librdkafka's default, `range` first, assigns topic by topic, which
    // gives each topic's first partitions to the same member: a group reading many topics of
    // few partitions (a whole database) leaves members idle. `range` stays listed second so a
    // group mixing members of an earlier release still agrees on a strategy.
    if !kip848 && !k.properties.contains_key("partition.assignment.strategy") {
        props.insert(
            "partition.assignment.strategy".into(),
            Secret::new("roundrobin,range"),
        );
    }
    if kip848 {
        for name in [
            "session.timeout.ms",
            "heartbeat.interval.ms",
            "partition.assignment.strategy",
            "group.protocol.type",
        ] {
            if k.properties.contains_key(name) {
                return Err(err(
                    format!("kafka.properties.\"{name}\""),
                    "not supported with group.protocol = \"consumer\": the broker sets it \
                     (group.consumer.* settings); remove it, or use the classic protocol",
                ));
            }
        }
    }
    if let Some(sec) = &k.security {
        let protocol = sec.protocol.to_ascii_uppercase();
        if !["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"].contains(&protocol.as_str()) {
            return Err(err(
                "kafka.security.protocol",
                format!(
                    "`{}` is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
                    sec.protocol
                ),
            ));
        }
        props.insert("security.protocol".into(), Secret::new(protocol.clone()));
        if let Some(m) = &sec.mechanism {
            let librdkafka = if m.eq_ignore_ascii_case("AWS_MSK_IAM") {
                if sec.region.is_none() {
                    return Err(err(
                        "kafka.security.region",
                        "AWS_MSK_IAM signs tokens for the cluster's region; set e.g. region = \"eu-west-1\"",
                    ));
                }
                if !protocol.starts_with("SASL") {
                    return Err(err("kafka.security.protocol", "AWS_MSK_IAM needs SASL_SSL"));
                }
                msk_iam_region = sec.region.clone();
                "OAUTHBEARER".to_string()
            } else if m.eq_ignore_ascii_case("OAUTHBEARER") {
                let Some(oidc) = &sec.oidc else {
                    return Err(err("kafka.security.oidc", NO_TOKEN_SOURCE));
                };
                oidc_properties(oidc, &mut props)?;
                "OAUTHBEARER".to_string()
            } else {
                m.clone()
            };
            props.insert("sasl.mechanism".into(), Secret::new(librdkafka));
        }
        if sec.oidc.is_some()
            && !sec
                .mechanism
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case("OAUTHBEARER"))
        {
            return Err(err(
                "kafka.security.oidc",
                "only with mechanism = \"OAUTHBEARER\"",
            ));
        }
        if let Some(u) = &sec.username {
            props.insert("sasl.username".into(), Secret::new(u.clone()));
        }
        if let Some(p) = &sec.password {
            props.insert("sasl.password".into(), p.clone());
        }
        if protocol.starts_with("SASL") && sec.mechanism.is_none() {
            return Err(err(
                "kafka.security.mechanism",
                "required with a SASL protocol (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER)",
            ));
        }
    }
    // OAUTHBEARER through raw properties: librdkafka's OIDC client (`sasl.oauthbearer.method =
    // "oidc"`) is a token source; anything else would start and fail every login.
    let oauthbearer = props
        .get("sasl.mechanism")
        .is_some_and(|m| m.expose().eq_ignore_ascii_case("OAUTHBEARER"));
    let oidc = props
        .get("sasl.oauthbearer.method")
        .is_some_and(|m| m.expose().eq_ignore_ascii_case("oidc"));
    if oauthbearer && msk_iam_region.is_none() && !oidc {
        return Err(err("kafka.security.oidc", NO_TOKEN_SOURCE));
    }
    if msk_iam_region.is_some() {
        if let Some(key) = props.keys().find(|k| k.starts_with("sasl.oauthbearer.")) {
            return Err(err(
                format!("kafka.properties.\"{key}\""),
                "not with AWS_MSK_IAM, whose tokens lakesink signs itself",
            ));
        }
    }
    // What `security` adds, checked like `properties` (an OIDC login needs a librdkafka built
    // with libcurl, which this build is).
    for (name, value) in &props {
        if !k.properties.contains_key(name) {
            librdkafka_accepts(name, value.expose())
                .map_err(|why| err("kafka.security", format!("`{name}`: {why}")))?;
        }
    }
    for (name, value, _) in FORCED {
        props.insert((*name).into(), Secret::new(*value));
    }
    let reset = props
        .entry("auto.offset.reset".into())
        .or_insert_with(|| Secret::new("earliest"));
    if !matches!(
        reset.expose(),
        "earliest" | "smallest" | "beginning" | "latest" | "largest" | "end"
    ) {
        return Err(err(
            "kafka.properties.\"auto.offset.reset\"",
            format!(
                "`{}`: must be `earliest` or `latest`. It only says where a sink with no \
                 position in its table starts; lakesink resolves out-of-range positions itself \
                 (see \"When the log and the table disagree\" in the README)",
                reset.expose()
            ),
        ));
    }
    Ok((props, msk_iam_region))
}

/// `[schema_registry]`, when there is one.
pub(super) fn validate_registry(
    r: Option<&SchemaRegistryConfig>,
) -> Result<Option<ValidatedRegistry>, ConfigError> {
    let registry = match r {
        Some(r) => {
            let url = url::Url::parse(&r.url).map_err(|e| {
                err(
                    "schema_registry.url",
                    format!("`{}` is not a URL: {e}", r.url),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(err(
                    "schema_registry.url",
                    "must be an http:// or https:// URL",
                ));
            }
            if url.password().is_some() {
                return Err(err(
                    "schema_registry.url",
                    "put credentials in `schema_registry.basic_auth`, not in the URL",
                ));
            }
            if r.basic_auth.is_some() && r.bearer_token.is_some() {
                return Err(err(
                    "schema_registry.bearer_token",
                    "set either `basic_auth` or `bearer_token`, not both",
                ));
            }
            if r.client_cert_file.is_some() != r.client_key_file.is_some() {
                return Err(err(
                    "schema_registry.client_key_file",
                    "mutual TLS needs both `client_cert_file` and `client_key_file`",
                ));
            }
            for (k, f) in [
                ("ca_file", &r.ca_file),
                ("client_cert_file", &r.client_cert_file),
                ("client_key_file", &r.client_key_file),
            ] {
                if let Some(f) = f {
                    if !f.is_file() {
                        return Err(err(
                            format!("schema_registry.{k}"),
                            format!("{} is not a readable file", f.display()),
                        ));
                    }
                }
            }
            Some(ValidatedRegistry {
                url: r.url.clone(),
                username: r.basic_auth.as_ref().map(|b| b.username.clone()),
                password: r.basic_auth.as_ref().map(|b| b.password.clone()),
                bearer_token: r.bearer_token.clone(),
                ca_file: r.ca_file.clone(),
                client_cert_file: r.client_cert_file.clone(),
                client_key_file: r.client_key_file.clone(),
                timeout: parse_duration(&r.timeout)
                    .map_err(|e| err("schema_registry.timeout", e))?,
            })
        }
        None => None,
    };
    Ok(registry)
}
