"""Protobuf records of every mapped type, produced with a third-party client (confluent-kafka's
ProtobufSerializer, which registers each version and its imports as references), and read back
with pyarrow.

Usage:
  protobuf_types.py produce BOOTSTRAP REGISTRY_URL TOPIC N V1.desc V2.desc EXPECTED_JSON
  protobuf_types.py check TABLE_DIR EXPECTED_JSON

V1.desc and V2.desc are FileDescriptorSets of two versions of `shop.Order` (V2 adds `channel`);
records alternate between them, version 1 first (the registry numbers versions as they register,
and the newest is the one every record is read with). Three poison records go in between; their offsets are written to
EXPECTED_JSON with the expected rows. `check` exits 1 naming every mismatch.
"""
import datetime
import json
import sys

UTC = datetime.timezone.utc
STATUS = ["STATUS_UNKNOWN", "PLACED", "SHIPPED"]


def expected_row(i, v2):
    return {
        "id": i,
        "qty": -i,
        "u32": 4294967295 - i,
        "u64": str(18446744073709551615 - i),
        "s32": -i * 3,
        "s64": -i * 1_000_000_007,
        "f32": i * 7,
        "f64": str((1 << 63) + i),
        "sf32": -i,
        "sf64": -(i << 40),
        "ratio": i / 4,
        "price": i * 1.5,
        "paid": i % 2 == 0,
        "customer": f"cust {i} ✓",
        "blob": bytes([i % 256, 0, 255]).hex(),
        "status": STATUS[i % 3],
        "total": None if i % 5 == 0 else {"units": i, "currency": "EUR"},
        "tags": [f"t{j}" for j in range(i % 3)],
        "counts": list(range(i % 4)),
        "lines": [{"sku": f"s{i}-{j}", "n": j} for j in range(i % 2 + 1)],
        "attrs": [[f"k{j}", j] for j in range(i % 3)],
        "payment": [{"card": f"card{i}", "voucher": None}, {"card": None, "voucher": i}, None][i % 3],
        "placed": datetime.datetime.fromtimestamp(1_700_000_000 + i, UTC).replace(microsecond=i).isoformat(),
        "wait": i * 1_000_000 + 500_000,
        "maybe": None if i % 2 else i,
        "extra": {"n": float(i), "s": "x"},
        "note": None if i % 4 == 0 else f"n{i}",
        "channel": f"web{i}" if v2 else "",
    }


def produce(bootstrap, registry, topic, n, v1_path, v2_path, expected_path):
    from confluent_kafka import Producer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    def load(path):
        fds = descriptor_pb2.FileDescriptorSet.FromString(open(path, "rb").read())
        pool = descriptor_pool.DescriptorPool()
        for f in fds.file:  # dependencies first
            pool.AddSerializedFile(f.SerializeToString())
        return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))

    classes = [load(v1_path), load(v2_path)]
    client = SchemaRegistryClient({"url": registry})
    serializers = [ProtobufSerializer(c, client, {"auto.register.schemas": True}) for c in classes]
    ctx = SerializationContext(topic, MessageField.VALUE)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    offsets = {}

    def delivered(key):
        def cb(err, msg):
            if err is not None:
                raise SystemExit(f"delivery failed: {err}")
            offsets[key] = msg.offset()
        return cb

    rows = {}
    first_v1 = None
    for i in range(n):
        # Version 1 first (it registers first), then both interleaved.
        v2 = i % 3 == 1
        m = classes[1 if v2 else 0]()
        want = expected_row(i, v2)
        for k in ["id", "qty", "u32", "s32", "s64", "f32", "sf32", "sf64", "ratio", "price", "paid",
                  "customer"]:
            setattr(m, k, want[k])
        m.u64 = 18446744073709551615 - i
        m.f64 = (1 << 63) + i
        m.blob = bytes([i % 256, 0, 255])
        m.status = i % 3
        if want["total"]:
            m.total.units = i
            m.total.currency = "EUR"
        m.tags.extend(want["tags"])
        m.counts.extend(want["counts"])
        for line in want["lines"]:
            m.lines.add(sku=line["sku"], n=line["n"])
        for k, v in want["attrs"]:
            m.attrs[k] = v
        if i % 3 == 0:
            m.card = f"card{i}"
        elif i % 3 == 1:
            m.voucher = i
        m.placed.seconds = 1_700_000_000 + i
        m.placed.nanos = i * 1000
        m.wait.seconds = i
        m.wait.nanos = 500_000_000
        if i % 2 == 0:
            m.maybe.value = i
        m.extra.fields["n"].number_value = i
        m.extra.fields["s"].string_value = "x"
        if i % 4:
            m.note = f"n{i}"
        if v2:
            m.channel = f"web{i}"
        body = serializers[1 if v2 else 0](m, ctx)
        if first_v1 is None and not v2:
            first_v1 = body
        rows[str(i)] = want
        producer.produce(topic, body, partition=0, on_delivery=delivered(("row", i)))
        if i in (n // 4, n // 2, 3 * n // 4):
            # Poison: a message-index path naming no message; a truncated message; not framed.
            poison = {
                n // 4: first_v1[:5] + b"\x02\x0e" + first_v1[6:],
                n // 2: first_v1[: len(first_v1) - 4],
                3 * n // 4: b"not protobuf",
            }[i]
            producer.produce(topic, poison, partition=0, on_delivery=delivered(("poison", i)))
        producer.poll(0)
    if producer.flush(30) != 0:
        raise SystemExit("records still in flight after 30 s")
    poison = sorted(off for (kind, _), off in offsets.items() if kind == "poison")
    json.dump({"rows": rows, "poison": poison}, open(expected_path, "w"))


def canonical(r):
    out = dict(r)
    for k in ("u64", "f64"):
        out[k] = str(out[k])
    out["blob"] = out["blob"].hex()
    out["attrs"] = sorted([k, v] for k, v in (out["attrs"] or []))
    out["placed"] = out["placed"].isoformat()
    out["extra"] = json.loads(out["extra"])
    return out


def check(root, expected_path):
    import pyarrow.dataset as ds

    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = json.load(open(expected_path))["rows"]
    files = ds.dataset(root, format="parquet").files
    # Files written before version 2 appeared lack its column: read all with the unified schema.
    schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    dataset = ds.dataset(files, schema=schema, format="parquet")
    table = dataset.to_table()
    problems = []
    types = {f.name: str(f.type) for f in table.schema}
    want_types = {"u64": "decimal128(20, 0)", "placed": "timestamp[us, tz=UTC]", "wait": "int64",
                  "status": "string", "extra": "string"}
    for k, t in want_types.items():
        if types.get(k) != t:
            problems.append(f"column {k} is {types.get(k)}, want {t}")
    seen = set()
    for r in table.to_pylist():
        key = str(r["id"])
        if key in seen:
            problems.append(f"id {key} appears twice")
        seen.add(key)
        want = expected.get(key)
        if want is None:
            problems.append(f"id {key} was never produced")
            continue
        got = canonical(r)
        if got.get("channel") is None and want["channel"] == "":
            got["channel"] = ""  # a version-1 row from before `channel` existed
        for field, value in want.items():
            if got.get(field) != value:
                problems.append(f"id {key} field {field} ({types.get(field)}): got {got.get(field)!r}, want {value!r}")
    missing = set(expected) - seen
    if missing:
        problems.append(f"{len(missing)} records missing, e.g. {sorted(missing)[:5]}")
    # Both versions in one file: the schema change did not cut files.
    mixed = 0
    for f in files:
        if "channel" not in pq.read_schema(f).names:
            continue
        channels = pq.read_table(f, columns=["channel"]).column("channel").to_pylist()
        if "" in channels and any(channels):
            mixed += 1
    if mixed == 0:
        problems.append(f"no file holds rows of both versions ({len(files)} files)")
    if problems:
        print("\n".join(problems[:40]))
        sys.exit(1)
    print(f"{len(seen)} rows match, {mixed} of {len(files)} files mix both versions")


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(*sys.argv[2:5], int(sys.argv[5]), *sys.argv[6:9])
    else:
        check(*sys.argv[2:4])
