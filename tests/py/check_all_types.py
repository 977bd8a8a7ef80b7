"""Reads the every-type table back with pyarrow and DuckDB and compares every value with what the
producer wrote. Usage: check_all_types.py TABLE_DIR EXPECTED_JSON. Exits 1 naming mismatches."""
import json
import sys

import duckdb
import pyarrow.dataset as ds

from all_types import canonical

root, expected_path = sys.argv[1:3]
expected = json.load(open(expected_path))
table = ds.dataset(root, format="parquet").to_table()
types = {f.name: str(f.type) for f in table.schema}
# DESIGN §5: uuid lands as a string, not 16 raw bytes.
if types.get("uid") != "string":
    raise SystemExit(f"uid is {types.get('uid')}, not string")
problems = []
seen = set()
# Nanosecond timestamps: python datetimes stop at microseconds, read the raw integers.
raw_ns = table.column("ts_ns").cast("int64").to_pylist() if "ts_ns" in table.column_names else None
rows = (table.drop_columns(["ts_ns"]) if raw_ns is not None else table).to_pylist()
for r, ns in zip(rows, raw_ns or []):
    r["ts_ns"] = ns
for r in rows:
    key = str(r["id"])
    if key in seen:
        problems.append(f"id {key} appears twice")
    seen.add(key)
    got = canonical(r)
    want = expected.get(key)
    if want is None:
        problems.append(f"id {key} was never produced")
        continue
    for field, value in want.items():
        if got[field] != value:
            problems.append(f"id {key} field {field} ({types.get(field)}): got {got[field]!r}, want {value!r}")
missing = set(expected) - seen
if missing:
    problems.append(f"{len(missing)} records missing, e.g. {sorted(missing)[:5]}")
# DuckDB reads the same files: exact decimal sums.
con = duckdb.connect()
q = con.execute(
    f"SELECT count(*), CAST(sum(dec_bytes) AS VARCHAR), CAST(sum(dec_fixed) AS VARCHAR) "
    f"FROM read_parquet('{root}/*.parquet')"
).fetchone()
import decimal

want_bytes = sum(decimal.Decimal(v["dec_bytes"]) for v in expected.values())
want_fixed = sum(decimal.Decimal(v["dec_fixed"]) for v in expected.values())
if q[0] != len(expected) or decimal.Decimal(q[1]) != want_bytes or decimal.Decimal(q[2]) != want_fixed:
    problems.append(f"duckdb: count/sums {q} != {len(expected)}, {want_bytes}, {want_fixed}")
print(json.dumps({"types": types, "problems": problems[:40], "problem_count": len(problems)}, indent=1))
sys.exit(1 if problems else 0)
