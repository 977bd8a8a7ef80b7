"""Produces records of every Avro type with a third-party client (confluent-kafka's
SchemaRegistryClient + AvroSerializer, which encodes with fastavro), and writes the expected
values, canonicalised, to a JSON file.

Usage: produce_all_types.py BOOTSTRAP REGISTRY_URL TOPIC N EXPECTED_JSON
"""
import datetime
import decimal
import json
import sys
import uuid

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from all_types import SCHEMA, canonical  # noqa: E402 (sets the decimal precision)

bootstrap, registry, topic, n, expected_path = sys.argv[1:6]
n = int(n)

UTC = datetime.timezone.utc


def row(i):
    base = datetime.datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
    return {
        "id": i,
        "b": i % 2 == 0,
        "i": -i * 1000,
        "f": i / 4.0,
        "d": i * 1.0e10 + 0.125,
        "s": f"row {i} ✓ ünïcödé",
        "raw": bytes([i % 256, 0, 255]),
        "fx": bytes([1, 2, 3, i % 256]),
        "dec_bytes": decimal.Decimal(i * 12345) / decimal.Decimal(10000) - decimal.Decimal("3.1416"),
        "dec_fixed": decimal.Decimal(f"{i}.{i:010d}"),
        "dec_wide": decimal.Decimal(f"{'9' * 50}{i:04d}.123456") * (-1 if i % 3 == 0 else 1),
        "dt": datetime.date(2026, 1, 1) + datetime.timedelta(days=i),
        "t_ms": datetime.time(13, 14, 15, (i % 1000) * 1000),
        "t_us": datetime.time(23, 59, 59, i % 1_000_000),
        "ts_ms": base + datetime.timedelta(milliseconds=i * 1001),
        "ts_us": base + datetime.timedelta(microseconds=i * 1_000_001),
        "lts_ms": (base + datetime.timedelta(milliseconds=i)).replace(tzinfo=None),
        "lts_us": (base + datetime.timedelta(microseconds=i)).replace(tzinfo=None),
        "uid": uuid.UUID(int=i * 0x1000_0000_0000_0001),
        "color": ["RED", "GREEN", "BLUE"][i % 3],
        "opt": None if i % 4 == 0 else i * 7,
        "nested": {"a": i, "tags": [f"t{j}" for j in range(i % 3)]},
        "opt_nested": None if i % 2 else {"a": -i, "tags": []},
        "arr": list(range(i % 4)),
        "m": {f"k{j}": j / 2.0 for j in range(i % 3)},
        "choice": [None, f"s{i}", i * 11][i % 3],
        "ts_ns": 1_795_262_400_000_000_000 + i * 1_000_000_007,
    }


client = SchemaRegistryClient({"url": registry})
serializer = AvroSerializer(client, json.dumps(SCHEMA))
producer = Producer({"bootstrap.servers": bootstrap})
expected = {}
for i in range(n):
    r = row(i)
    value = serializer(r, SerializationContext(topic, MessageField.VALUE))
    producer.produce(topic, value=value, partition=0)
    expected[i] = canonical(r)
    producer.poll(0)
left = producer.flush(30)
if left:
    raise SystemExit(f"{left} messages not delivered")
with open(expected_path, "w") as f:
    json.dump(expected, f)
print(f"produced {n} records with schema id {client.get_latest_version(topic + '-value').schema_id}")
