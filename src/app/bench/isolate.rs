//! `lakesink bench --isolate`: the decoder and the Parquet encoder alone, on one thread, from
//! records in memory.

use super::*;

/// `lakesink bench --isolate`: the decoder and the Parquet encoder alone, on one thread, from
/// records already in memory (no Kafka, no partitioning, no object store; keys and payloads in
/// arena chunks, as the poll thread leaves them). Decodes `records`
/// order lines of `format` with the pipeline's decoder (batches of 1024 rows, metadata
/// columns) and encodes every batch into one Parquet file in memory with the sinks' writer
/// settings; prints records/s per core for each step and both.
pub async fn isolate(records: u64, format: &str) -> anyhow::Result<()> {
    let m = measure_alone(records, format).await?;
    let per = |secs: f64| records as f64 / secs.max(1e-9);
    println!(
        "lakesink bench --isolate: {records} {format} order lines ({:.0} bytes each) decoded and encoded on one thread, from memory",
        m.bytes_in as f64 / records as f64
    );
    println!(
        "  decode:    {:.2} CPU s ({:.2} s) = {:.0} records/s per core",
        m.decode_cpu,
        m.decode_wall,
        per(m.decode_cpu)
    );
    println!(
        "  encode:    {:.2} CPU s ({:.2} s) = {:.0} records/s per core, {:.1} MB of Parquet",
        m.encode_cpu,
        m.encode_wall,
        per(m.encode_cpu),
        m.file_bytes as f64 / 1e6
    );
    println!(
        "  both:      {:.0} records/s per core",
        per(m.decode_cpu + m.encode_cpu)
    );
    let batches = m.batches;
    tokio::task::spawn_blocking(move || encode_breakdown(&batches, records)).await??;
    Ok(())
}

/// Where the Parquet encode's time goes: the same batches encoded again under writer settings
/// that do less work (down to parquet-rs's least: plain encoding, no statistics, no
/// compression), then one column at a time with the sinks' settings. On the calling thread.
pub(super) fn encode_breakdown(batches: &[RecordBatch], records: u64) -> anyhow::Result<()> {
    use parquet::file::properties::EnabledStatistics;
    use sinks::encode::{writer_properties, writer_properties_for, Compression};
    let Some(first) = batches.first() else {
        return Ok(());
    };
    let us = |cpu: f64| cpu * 1e6 / records as f64;
    let rows = sinks::encode::RowGroups::default();
    let settings = [
        (
            "the sinks' (snappy, dictionary where it pays, page statistics)",
            writer_properties_for(Compression::Snappy, rows, first),
        ),
        (
            "uncompressed",
            writer_properties_for(Compression::None, rows, first),
        ),
        (
            "uncompressed, column-chunk statistics only",
            writer_properties_for(Compression::None, rows, first)
                .into_builder()
                .set_statistics_enabled(EnabledStatistics::Chunk)
                .build(),
        ),
        (
            "uncompressed, no statistics, no dictionary (parquet-rs's least work)",
            writer_properties(Compression::None, rows)
                .into_builder()
                .set_statistics_enabled(EnabledStatistics::None)
                .set_dictionary_enabled(false)
                .build(),
        ),
    ];
    println!("  encode again, by writer setting:");
    for (name, props) in settings {
        let (cpu, bytes) = encode_cpu(batches, props)?;
        println!(
            "    {:.2} CPU s = {:.3} µs per record, {:.1} MB: {name}",
            cpu,
            us(cpu),
            bytes as f64 / 1e6
        );
    }
    println!("  encode again, one column at a time (the sinks' settings):");
    let schema = first.schema();
    let mut total = 0.0;
    for (i, field) in schema.fields().iter().enumerate() {
        let column: Vec<RecordBatch> = batches
            .iter()
            .map(|b| b.project(&[i]))
            .collect::<Result<_, _>>()?;
        let props = writer_properties_for(Compression::Snappy, rows, &column[0]);
        let (cpu, _) = encode_cpu(&column, props)?;
        total += cpu;
        println!(
            "    {:.3} µs per record: {} ({})",
            us(cpu),
            field.name(),
            field.data_type()
        );
    }
    println!("    {:.3} µs per record: all columns, summed", us(total));
    Ok(())
}

/// Encodes `batches` into one Parquet file in memory; the thread's CPU seconds and the size.
pub(super) fn encode_cpu(
    batches: &[RecordBatch],
    props: parquet::file::properties::WriterProperties,
) -> anyhow::Result<(f64, usize)> {
    let cpu = thread_cpu_seconds();
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), batches[0].schema(), Some(props))?;
    for b in batches {
        w.write(b)?;
    }
    let file = w.into_inner()?;
    Ok((thread_cpu_seconds() - cpu, file.len()))
}

/// What [`measure_alone`] measured.
pub(super) struct Alone {
    pub(super) decode_wall: f64,
    pub(super) decode_cpu: f64,
    pub(super) encode_wall: f64,
    pub(super) encode_cpu: f64,
    pub(super) bytes_in: usize,
    pub(super) file_bytes: usize,
    /// The decoded batches, for [`encode_breakdown`].
    pub(super) batches: Vec<RecordBatch>,
}

/// Decodes and then encodes `records` order lines on one thread, from memory (see [`isolate`]).
pub(super) async fn measure_alone(records: u64, format: &str) -> anyhow::Result<Alone> {
    use crate::decode::{AvroDecoder, FormatDecoder, JsonDecoder, Record};
    anyhow::ensure!(
        matches!(format, "avro" | "json" | "protobuf"),
        "--isolate measures --format avro, json or protobuf, not `{format}`"
    );
    let (addr, _registry) = schema_registry::server::spawn("127.0.0.1:0".parse()?, None).await?;
    let registry_url = format!("http://{addr}");
    let topic = "bench.isolate";
    let client = RegistryClient::new(RegistryConfig::new(&registry_url))?;
    let schema_id = register_order_schema(&client, &format!("{topic}-value"), format).await?;
    let opts = Options {
        records,
        partitions: 1,
        format: format.to_string(),
        kind: "parquet".into(),
        mode: "append".into(),
        databend: None,
        broker: None,
        rate: None,
        max_latency: "1s".into(),
        tables: 1,
        one_sink: false,
        pipeline: None,
        sink: None,
        members: Vec::new(),
        member_cpus: None,
    };
    let text = sink_config(
        demo_config(
            "127.0.0.1:9",
            &registry_url,
            std::path::Path::new("/tmp/unused"),
            "g",
        )
        .replace("demo.orders", topic),
        &opts,
        "",
    )?;
    let cfg = Config::from_toml(&text)?.validate()?;
    let sink = cfg.sinks[0].clone();
    let schema = order_schema();
    // Keys and payloads share arena chunks, as the pipeline's poll thread copies them.
    let mut arena = bytes::BytesMut::new();
    let input: Vec<Record> = (0..records as i64)
        .map(|id| Record {
            offset: id,
            timestamp_ms: Some(Order::generate(id).ts_ms),
            key: Some(crate::kafka::arena_copy(
                &mut arena,
                Order::generate(id).order_id.as_bytes(),
            )),
            payload: Some(crate::kafka::arena_copy(
                &mut arena,
                &payload(format, id, &schema, schema_id),
            )),
            headers: Vec::new(),
        })
        .collect();
    let bytes_in: usize = input
        .iter()
        .map(|r| r.payload.as_ref().map_or(0, |p| p.len()))
        .sum();
    let format = format.to_string();
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<(usize, Alone)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let tp = sinks::TopicPartition::new(topic, 0);
            let mut decoder = match format.as_str() {
                "avro" => {
                    FormatDecoder::Avro(Box::new(AvroDecoder::new(tp, client, sink.metadata, 1024)))
                }
                "protobuf" => FormatDecoder::Protobuf(Box::new(
                    crate::decode::ProtobufDecoder::new(tp, client, sink.metadata, 1024),
                )),
                _ => FormatDecoder::Json(Box::new(JsonDecoder::new(
                    tp,
                    sink.json_schema.clone().context("a declared JSON schema")?,
                    false,
                    false,
                    sink.metadata,
                    1024,
                ))),
            };
            decoder
                .prepare(&input[0])
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (mut out, mut rejected) = (Vec::new(), Vec::new());
            let (wall, cpu) = (Instant::now(), thread_cpu_seconds());
            for rec in input {
                decoder
                    .push(rec, &mut out, &mut rejected)
                    .await
                    .map_err(|r| anyhow::anyhow!("{}", r.error))?;
            }
            decoder
                .finish(&mut out, &mut rejected)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(rejected.is_empty(), "{} records rejected", rejected.len());
            let (decode_wall, decode_cpu) =
                (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
            let (wall, cpu) = (Instant::now(), thread_cpu_seconds());
            let props = sinks::encode::writer_properties_for(
                sinks::encode::Compression::Snappy,
                sinks::encode::RowGroups::default(),
                &out[0],
            );
            let mut w =
                parquet::arrow::ArrowWriter::try_new(Vec::new(), out[0].schema(), Some(props))?;
            let mut rows = 0;
            for b in &out {
                rows += b.num_rows();
                w.write(b)?;
            }
            let file = w.into_inner()?;
            let (encode_wall, encode_cpu) =
                (wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu);
            let alone = Alone {
                decode_wall,
                decode_cpu,
                encode_wall,
                encode_cpu,
                bytes_in,
                file_bytes: file.len(),
                batches: out,
            };
            Ok((rows, alone))
        })
    })
    .await??;
    let (rows, alone) = report;
    anyhow::ensure!(rows as u64 == records, "decoded {rows} rows of {records}");
    Ok(alone)
}
