"""Reads a Delta table with python `deltalake` and prints its rows as JSON, each value in a
canonical text form the Debezium end-to-end test compares with PostgreSQL's:
decimal → its exact text; date → YYYY-MM-DD; timestamp → YYYY-MM-DD HH:MM:SS.ffffff (UTC
when zoned); binary → lowercase hex; list → compact JSON; boolean → true/false; integers and
strings as they are; null → null.

Usage: canonical_delta.py URL
"""
import datetime
import decimal
import json
import os
import sys

from deltalake import DeltaTable


def canon(v):
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return v.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def main():
    url = sys.argv[1]
    dt = DeltaTable(url[len("file://"):] if url.startswith("file://") else url)
    # As read_delta.py reads: through the pyarrow dataset.
    table = dt.to_pyarrow_dataset().to_table()
    rows = [{k: canon(v) for k, v in r.items()} for r in table.to_pylist()]
    print(json.dumps({"rows": rows, "schema": {f.name: str(f.type) for f in table.schema}}))


main()
# deltalake's native threads can abort the interpreter's teardown ("terminate called without
# an active exception", delta-io/delta-rs#2184) after the output is complete: end without it.
sys.stdout.flush()
os._exit(0)
