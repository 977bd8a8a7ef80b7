"""The every-type Avro schema of the formats test and a canonical form of its values, shared by
the producer (python values) and the checker (values pyarrow reads back)."""
import datetime
import decimal
import uuid

# Decimals up to precision 76 (Decimal256) need more than the default 28 digits.
decimal.getcontext().prec = 100

SCHEMA = {
    "type": "record",
    "name": "AllTypes",
    "namespace": "lakesink.test",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "b", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "s", "type": "string"},
        {"name": "raw", "type": "bytes"},
        {"name": "fx", "type": {"type": "fixed", "name": "F4", "size": 4}},
        {"name": "dec_bytes", "type": {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 4}},
        {"name": "dec_fixed", "type": {"type": "fixed", "name": "D16", "size": 16, "logicalType": "decimal", "precision": 38, "scale": 10}},
        {"name": "dec_wide", "type": {"type": "bytes", "logicalType": "decimal", "precision": 60, "scale": 6}},
        {"name": "dt", "type": {"type": "int", "logicalType": "date"}},
        {"name": "t_ms", "type": {"type": "int", "logicalType": "time-millis"}},
        {"name": "t_us", "type": {"type": "long", "logicalType": "time-micros"}},
        {"name": "ts_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "ts_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "lts_ms", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "lts_us", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "opt", "type": ["null", "long"], "default": None},
        {"name": "nested", "type": {"type": "record", "name": "Inner", "fields": [
            {"name": "a", "type": "int"},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
        ]}},
        {"name": "opt_nested", "type": ["null", "Inner"], "default": None},
        {"name": "arr", "type": {"type": "array", "items": "long"}},
        {"name": "m", "type": {"type": "map", "values": "double"}},
        {"name": "choice", "type": ["null", "string", "long"], "default": None},
        {"name": "ts_ns", "type": {"type": "long", "logicalType": "timestamp-nanos"}},
    ],
}


def canonical(r):
    """A JSON-able canonical form: exact decimals as strings with their scale, times and
    timestamps as integers of their unit, bytes as hex, uuids as strings."""

    def dec(v, scale):
        return str(decimal.Decimal(v).quantize(decimal.Decimal(1).scaleb(-scale)))

    def micros_of_day(t):
        return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond

    def epoch_us(ts):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=datetime.timezone.utc)
        delta = ts - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds

    def uid(v):
        if isinstance(v, (bytes, bytearray)) and len(v) == 16:
            return str(uuid.UUID(bytes=bytes(v)))
        return str(v)

    m = r["m"]
    if isinstance(m, list):
        m = dict(m)
    return {
        "id": r["id"],
        "b": r["b"],
        "i": r["i"],
        "f": float(r["f"]),
        "d": float(r["d"]),
        "s": r["s"],
        "raw": bytes(r["raw"]).hex(),
        "fx": bytes(r["fx"]).hex(),
        "dec_bytes": dec(r["dec_bytes"], 4),
        "dec_fixed": dec(r["dec_fixed"], 10),
        "dec_wide": dec(r["dec_wide"], 6),
        "dt": (r["dt"] - datetime.date(1970, 1, 1)).days,
        "t_ms": micros_of_day(r["t_ms"]),
        "t_us": micros_of_day(r["t_us"]),
        "ts_ms": epoch_us(r["ts_ms"]),
        "ts_us": epoch_us(r["ts_us"]),
        "lts_ms": epoch_us(r["lts_ms"]),
        "lts_us": epoch_us(r["lts_us"]),
        "uid": uid(r["uid"]),
        "color": r["color"],
        "opt": r["opt"],
        "nested": {"a": r["nested"]["a"], "tags": list(r["nested"]["tags"])},
        "opt_nested": None if r["opt_nested"] is None else {"a": r["opt_nested"]["a"], "tags": list(r["opt_nested"]["tags"])},
        "arr": list(r["arr"]),
        "m": sorted([k, float(v)] for k, v in m.items()),
        "choice": union(r["choice"]),
        "ts_ns": nanos(r["ts_ns"]),
    }


def union(v):
    """A general union reads back as a struct with one field per non-null branch."""
    if v is None:
        return None
    if isinstance(v, dict):
        return {"string": v.get("string"), "long": v.get("long")}
    if isinstance(v, str):
        return {"string": v, "long": None}
    return {"string": None, "long": v}


def nanos(v):
    """Nanoseconds since the epoch, from an int (the producer's value) or a pandas/pyarrow
    timestamp (what pyarrow reads back)."""
    if isinstance(v, int):
        return v
    if hasattr(v, "value"):
        return int(v.value)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    if v.tzinfo is None:
        v = v.replace(tzinfo=datetime.timezone.utc)
    d = v - epoch
    return ((d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds) * 1000
