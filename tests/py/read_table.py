"""Reads a lakesink Parquet table with independent readers (pyarrow and DuckDB) and prints JSON.

Usage: read_table.py URL [--s3-endpoint URL] [--azure-endpoint URL] [--gcs-endpoint URL]

The table is first copied to a local directory (boto3 for s3://, azure-storage-blob for az://, GCS's JSON API
for gs://),
skipping nothing: the readers themselves must ignore `_lakesink/` (pyarrow ignores `_`-prefixed
paths; DuckDB's glob only matches `*.parquet`, which staged files are not).

Output: {"rows": [...], "duckdb": {"count", "distinct", "sum_cost"}, "files": [...]}
"""
import argparse
import json
import os
import sys
import tempfile
from urllib.parse import urlparse

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from orders import order_row

AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def fetch(url, s3_endpoint, azure_endpoint, dest, gcs_endpoint=None):
    u = urlparse(url)
    prefix = u.path.lstrip("/")
    if u.scheme == "file":
        return u.path
    if u.scheme == "s3":
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=s3_endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        )
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=u.netloc, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):].lstrip("/")
                path = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                s3.download_file(u.netloc, obj["Key"], path)
        return dest
    if u.scheme == "az":
        from azure.storage.blob import BlobServiceClient

        svc = BlobServiceClient(
            account_url=azure_endpoint,
            credential={"account_name": "devstoreaccount1", "account_key": AZURITE_KEY},
        )
        container = svc.get_container_client(u.netloc)
        for blob in container.list_blobs(name_starts_with=prefix):
            rel = blob.name[len(prefix):].lstrip("/")
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(container.download_blob(blob.name).readall())
        return dest
    if u.scheme == "gs":
        import urllib.parse
        import urllib.request

        token = None
        while True:
            q = {"prefix": prefix}
            if token:
                q["pageToken"] = token
            listing = json.load(
                urllib.request.urlopen(
                    f"{gcs_endpoint}/storage/v1/b/{u.netloc}/o?{urllib.parse.urlencode(q)}"
                )
            )
            for obj in listing.get("items", []):
                rel = obj["name"][len(prefix):].lstrip("/")
                path = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                name = urllib.parse.quote(obj["name"], safe="")
                with urllib.request.urlopen(
                    f"{gcs_endpoint}/storage/v1/b/{u.netloc}/o/{name}?alt=media"
                ) as r, open(path, "wb") as f:
                    f.write(r.read())
            token = listing.get("nextPageToken")
            if not token:
                return dest
    raise SystemExit(f"unsupported url {url}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--s3-endpoint")
    ap.add_argument("--azure-endpoint")
    ap.add_argument("--gcs-endpoint")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch(a.url, a.s3_endpoint, a.azure_endpoint, tmp, a.gcs_endpoint)
        files = []
        for d, _, names in os.walk(root):
            for n in names:
                files.append(os.path.relpath(os.path.join(d, n), root))
        visible = [f for f in files if f.endswith(".parquet") and not f.startswith("_")]
        rows = []
        if visible:
            # An evolved table has files with and without the newer columns: unify their schemas
            # (Spark's mergeSchema, DuckDB's union_by_name).
            schemas = [pq.read_schema(os.path.join(root, f)) for f in visible]
            unified = pa.unify_schemas(schemas, promote_options="permissive")
            probe = ds.dataset(root, format="parquet", partitioning="hive")
            for name in probe.schema.names:
                if name not in unified.names:
                    unified = unified.append(probe.schema.field(name))
            table = ds.dataset(root, format="parquet", partitioning="hive", schema=unified).to_table()
            rows = [order_row(r) for r in table.to_pylist()]
            src = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
            cost = "CAST(sum(cost) AS VARCHAR)" if "cost" in table.column_names else "NULL"
            q = duckdb.connect().execute(
                "SELECT count(*), count(DISTINCT (_kafka_partition, _kafka_offset)), "
                f"{cost} FROM {src}"
            ).fetchone()
            duck = {"count": q[0], "distinct": q[1], "sum_cost": q[2]}
        else:
            duck = {"count": 0, "distinct": 0, "sum_cost": None}
        json.dump({"rows": rows, "duckdb": duck, "files": sorted(files)}, sys.stdout)


if __name__ == "__main__":
    main()
