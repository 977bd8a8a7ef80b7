"""Dumps a local Parquet table (Hive partitions, schemas unified) as JSON with canonical values:
decimals as strings, dates as days, times and timestamps as integer microseconds (naive ones taken
as UTC), bytes as hex. Usage: dump_table.py DIR [--hive] (--hive: read Hive partition columns from\nthe directory names)"""
import datetime
import decimal
import json
import os
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def plain(v):
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        d = v - EPOCH
        return (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds
    if isinstance(v, datetime.date):
        return (v - datetime.date(1970, 1, 1)).days
    if isinstance(v, datetime.time):
        return ((v.hour * 60 + v.minute) * 60 + v.second) * 1_000_000 + v.microsecond
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


root = sys.argv[1]
if "--hive" in sys.argv[2:]:
    # Partition values as a Hive reader sees them: decoded from the directory names.
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    json.dump(
        {
            "types": {f.name: str(f.type) for f in table.schema},
            "columns": table.schema.names,
            "rows": [{k: plain(v) for k, v in r.items()} for r in table.to_pylist()],
        },
        sys.stdout,
    )
    sys.exit(0)
files = [
    os.path.join(d, n)
    for d, _, names in os.walk(root)
    for n in names
    if n.endswith(".parquet") and "/_" not in os.path.join(d, n)[len(root):]
]
if not files:
    json.dump({"types": {}, "columns": [], "rows": []}, sys.stdout)
    sys.exit(0)
schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
table = ds.dataset(files, format="parquet", schema=schema).to_table()
json.dump(
    {
        "types": {f.name: str(f.type) for f in table.schema},
        "columns": table.schema.names,
        "rows": [{k: plain(v) for k, v in r.items()} for r in table.to_pylist()],
    },
    sys.stdout,
)
