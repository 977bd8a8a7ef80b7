//! What the bench runs: the topics and tables of a run, the workload's records, the sink
//! config, and the read-back of an upserted table.

use super::*;

/// The topics of a run over `tables` tables: `topic` itself for one.
pub fn topics(topic: &str, tables: u32) -> Vec<String> {
    match tables {
        0 | 1 => vec![topic.to_string()],
        n => (0..n).map(|i| format!("{topic}.t{i:02}")).collect(),
    }
}

/// `section` with its table (named `orders`, last in its `table = ` line) renamed to `name`.
fn rename_table(section: &str, name: &str) -> String {
    let line = section
        .lines()
        .find(|l| l.starts_with("table = "))
        .expect("a table line");
    let at = line.rfind("orders").expect("the table is named orders");
    let renamed = format!("{}{name}{}", &line[..at], &line[at + "orders".len()..]);
    section.replace(line, &renamed)
}

/// Repeats the config's one `[[sink]]` section for every topic, each with its own name and
/// table (`orders_00`, ...).
pub(super) fn per_table(text: &str, topic: &str, topics: &[String]) -> String {
    if topics.len() <= 1 {
        return text.to_string();
    }
    let at = text.find("[[sink]]").expect("a sink section");
    let (head, section) = text.split_at(at);
    let mut out = head.to_string();
    for (i, t) in topics.iter().enumerate() {
        let renamed = rename_table(section, &format!("orders_{i:02}"));
        out.push_str(
            &renamed
                .replace("name = \"orders\"", &format!("name = \"orders_{i:02}\""))
                .replace(
                    &format!("topics = [\"{topic}\"]"),
                    &format!("topics = [\"{t}\"]"),
                ),
        );
        out.push('\n');
    }
    out
}

/// The config's one `[[sink]]` made to read every topic of the run through one `topics_regex`
/// sink whose `{table}` template gives each topic its own table (a whole database in one sink).
pub(super) fn one_sink(text: &str, topic: &str) -> String {
    rename_table(text, "{table}").replace(
        &format!("topics = [\"{topic}\"]"),
        &format!("topics_regex = '^{}\\.t[0-9]+$'", regex::escape(topic)),
    )
}

/// Registers the order-line schema of `format` (Avro, or Protobuf for `protobuf`) under
/// `subject`.
pub(super) async fn register_order_schema(
    registry: &RegistryClient,
    subject: &str,
    format: &str,
) -> anyhow::Result<SchemaId> {
    Ok(match format {
        "protobuf" => {
            registry
                .register_protobuf(subject, crate::app::workload::ORDER_PROTO, &[])
                .await?
        }
        _ => registry.register(subject, ORDER_SCHEMA).await?,
    })
}

/// The workload's value for order `id` in `format`.
pub(super) fn payload(
    format: &str,
    id: i64,
    schema: &apache_avro::Schema,
    schema_id: SchemaId,
) -> Vec<u8> {
    let order = Order::generate(id);
    match format {
        "avro" => wire::frame(schema_id, &order.encode(schema)),
        "protobuf" => {
            let mut body = wire::message_indexes(&crate::app::workload::ORDER_PROTO_PATH);
            body.extend(order.encode_protobuf());
            wire::frame(schema_id, &body)
        }
        "json" => order.json_line().into_bytes(),
        _ => {
            // Debezium JSON envelope (JSON converter without schemas); an order's first line
            // is a create, later lines of the same order id updates.
            let after = order.json_line();
            let op = if id % 3 == 0 { "c" } else { "u" };
            format!(
                r#"{{"before":null,"after":{after},"source":{{"connector":"mysql","db":"shop","table":"order_lines","ts_ms":{}}},"op":"{op}","ts_ms":{}}}"#,
                order.ts_ms, order.ts_ms
            )
            .into_bytes()
        }
    }
}

/// Bytes of one record of `format` (for sizing the in-process cluster's partitions).
pub(super) fn record_bytes(format: &str) -> u64 {
    match format {
        "avro" | "protobuf" => 100,
        "json" => 200,
        _ => 340,
    }
}

/// librdkafka's in-process cluster keeps at most 5 MiB and 100,000 records per partition and
/// silently drops older records, so larger runs are spread over more partitions.
pub fn partitions_for(records: u64, format: &str, at_least: i32) -> i32 {
    let per_partition = ((4 << 20) / record_bytes(format)).min(90_000);
    at_least.max(records.div_ceil(per_partition) as i32)
}

/// The sink section of the bench config for `opts`: the demo's Parquet sink rewritten.
pub(super) fn sink_config(base: String, opts: &Options, database: &str) -> anyhow::Result<String> {
    // Default flush settings: memory pressure, not the demo's row limit, decides file sizes.
    let flush_line = base
        .lines()
        .find(|l| l.starts_with("flush = "))
        .map(|l| format!("{l}\n"))
        .unwrap_or_default();
    let flush = match opts.rate {
        Some(_) => format!("flush = {{ max_latency = \"{}\" }}\n", opts.max_latency),
        None => String::new(),
    };
    let mut text = base
        .replace(&flush_line, &flush)
        .replace("kind = \"parquet\"", &format!("kind = \"{}\"", opts.kind));
    match opts.format.as_str() {
        "json" => {
            text = text.replace(
                "format = \"avro\"",
                &format!("format = \"json\"\nschema = {ORDER_JSON_SCHEMA}"),
            )
        }
        "debezium" => {
            text = text.replace(
                "format = \"avro\"",
                &format!("format = \"debezium-json\"\nschema = {ORDER_JSON_SCHEMA}"),
            )
        }
        "protobuf" => text = text.replace("format = \"avro\"", "format = \"protobuf\""),
        _ => {}
    }
    if opts.kind == "databend" {
        let url = opts
            .databend
            .as_deref()
            .context("--kind databend needs --databend http://user:password@host:port")?;
        let table_line = text
            .lines()
            .find(|l| l.starts_with("table = "))
            .context("demo config has a table")?
            .to_string();
        text = text
            .replace(
                &table_line,
                &format!(
                    "table = \"orders\"\ndatabend = {{ url = \"{}/{database}\" }}",
                    url.trim_end_matches('/')
                ),
            )
            .replace("partition_by = [\"day(ts)\"]\n", "");
    }
    if opts.mode == "upsert" {
        text = text.replace(
            "\nkind = ",
            "\nmode = \"upsert\"\nkey = [\"order_id\"]\nkind = ",
        );
    }
    Ok(text)
}

/// Reads back the upserted tables: one row per order (`order_id = "o-{id / 3}"`, each order in
/// one table), each the order's last change (the largest `id`).
pub(super) async fn check_upserted(
    tables: &[std::path::PathBuf],
    records: u64,
) -> anyhow::Result<()> {
    let (mut rows, mut orders, mut ids) = (0, 0, 0);
    for table in tables {
        let url = url::Url::from_directory_path(table)
            .map_err(|()| anyhow::anyhow!("{} is not an absolute path", table.display()))?;
        let out = sinks::delta::query(
            url.as_str(),
            "SELECT count(*), count(DISTINCT order_id), sum(id) FROM t",
        )
        .await
        .context("reading back the upserted table")?;
        let value = |c: usize| -> anyhow::Result<i64> {
            let v = arrow::compute::cast(out[0].column(c), &arrow::datatypes::DataType::Int64)?;
            Ok(v.as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .context("an Int64 column")?
                .value(0))
        };
        rows += value(0)?;
        orders += value(1)?;
        ids += value(2)?;
    }
    let want_orders = records.div_ceil(3) as i64;
    let want_ids: i64 = (0..want_orders)
        .map(|k| (3 * k + 2).min(records as i64 - 1))
        .sum();
    anyhow::ensure!(
        (rows, orders, ids) == (want_orders, want_orders, want_ids),
        "the upserted table has {rows} rows of {orders} orders with ids summing to {ids}; \
         expected {want_orders} rows, one per order, summing to {want_ids}"
    );
    println!(
        "  check:     {rows} rows in {} table(s), one per order, each its last change (read back)",
        tables.len()
    );
    Ok(())
}
