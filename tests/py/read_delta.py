"""Reads a Delta table with independent readers (python `deltalake` and DuckDB over its pyarrow
dataset; over its DataFusion scan for a table with deletion vectors) and prints JSON.

Usage: read_delta.py URL [--s3-endpoint URL] [--azure-endpoint URL] [--gcs-account FILE] [--app-id ID ...]
                         [--azurite-url URL] [--key COL]

Output: {"rows": [...] (order rows as in orders.py, else every column), "duckdb": {"count", "distinct"}, "schema": {col: type}, "version": N,
         "partition_columns": [...], "txn": {app_id: version}, "files": N (active data files),
         "stored_files": N (data files in storage, referenced or not) or null,
         "checkpoints": N, "history": [operation, ...]}
"""
import argparse
import json
import os
import sys

import duckdb
import pyarrow as pa
from deltalake import DeltaTable

from orders import order_row, plain

AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def options(a):
    if a.url.startswith("s3://"):
        return {
            "AWS_ENDPOINT_URL": a.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }
    if a.url.startswith("az://"):
        return {
            "account_name": "devstoreaccount1",
            "access_key": AZURITE_KEY,
            "endpoint": a.azure_endpoint,
            "allow_http": "true",
        }
    if a.url.startswith("gs://"):
        # fake-gcs-server: a service-account file naming its base URL, OAuth off (object_store).
        return {"google_service_account_path": a.gcs_account}
    if a.url.startswith("abfss://"):
        os.environ["AZURITE_BLOB_STORAGE_URL"] = a.azurite_url
        return {"use_emulator": "true"}
    return {}


def txn_versions(dt, app_ids):
    out = {}
    for app in app_ids:
        try:
            out[app] = dt.transaction_version(app)
        except AttributeError:
            out[app] = None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--s3-endpoint")
    ap.add_argument("--azure-endpoint")
    ap.add_argument("--azurite-url")
    ap.add_argument("--gcs-account")
    ap.add_argument("--app-id", action="append", default=[])
    a = ap.parse_args()
    url = a.url[len("file://"):] if a.url.startswith("file://") else a.url
    dt = DeltaTable(url, storage_options=options(a))
    protocol = dt.protocol()
    if "deletionVectors" in (protocol.reader_features or []):
        # deltalake's pyarrow dataset refuses tables with deletion vectors; its DataFusion scan
        # applies them (and DuckDB reads that scan's rows).
        table = pa.RecordBatchReader.from_stream(dt.scan()).read_all()
        dataset = table
    else:
        dataset = dt.to_pyarrow_dataset()
        table = dataset.to_table()
    raw = table.to_pylist()
    orders = "_kafka_partition" in table.column_names and "order_id" in table.column_names
    rows = [order_row(r) if orders else {k: plain(v) for k, v in r.items()} for r in raw]
    con = duckdb.connect()
    con.register("t", dataset)
    names = table.column_names
    if "_kafka_partition" in names:
        q = con.execute(
            "SELECT count(*), count(DISTINCT (_kafka_partition, _kafka_offset)) FROM t"
        ).fetchone()
    else:
        q = con.execute("SELECT count(*), count(*) FROM t").fetchone()
    schema = {f.name: str(f.type) for f in table.schema}
    stored = None
    checkpoints = None
    if a.url.startswith("file://"):
        stored = 0
        for d, dirs, files in os.walk(url):
            if "_delta_log" in d.split(os.sep):
                continue
            stored += sum(1 for f in files if f.endswith(".parquet"))
        log = os.path.join(url, "_delta_log")
        checkpoints = sum(1 for f in os.listdir(log) if ".checkpoint." in f)
    history = [h.get("operation") for h in dt.history()]
    json.dump(
        {
            "rows": rows,
            "duckdb": {"count": q[0], "distinct": q[1]},
            "schema": schema,
            "version": dt.version(),
            "partition_columns": dt.metadata().partition_columns,
            "txn": txn_versions(dt, a.app_id),
            "files": len(dt.file_uris()),
            "stored_files": stored,
            "checkpoints": checkpoints,
            "history": history,
        },
        sys.stdout,
        default=str,
    )


if __name__ == "__main__":
    main()
    # deltalake's native threads can abort the interpreter's teardown ("terminate called
    # without an active exception", delta-io/delta-rs#2184) after the output is complete.
    sys.stdout.flush()
    os._exit(0)
