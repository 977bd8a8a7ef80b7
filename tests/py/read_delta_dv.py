"""Reads a local Delta table with independent readers that apply deletion vectors, and says what a
reader that cannot does.

Usage: read_delta_dv.py PATH

Output (JSON): {"rows": [{"id", "name"}...] sorted by id (python deltalake's DataFusion scan),
  "duckdb": {"count", "ids", "names"} (DuckDB over that scan's Arrow stream),
  "pyarrow_dataset": "refused: ..." | "read N rows" (deltalake's pyarrow dataset),
  "reader_features": [...], "writer_features": [...], "min_reader": N, "min_writer": N,
  "files_with_dv": N}
"""
import json
import os
import sys

import duckdb
import pyarrow as pa
from deltalake import DeltaTable


def read_all(stream):
    """An Arrow stream (deltalake returns arro3 readers) as a pyarrow table."""
    return pa.RecordBatchReader.from_stream(stream).read_all()


def main():
    path = sys.argv[1]
    dt = DeltaTable(path)
    scanned = read_all(dt.scan(columns=["id", "name"]))
    rows = sorted(scanned.to_pylist(), key=lambda r: r["id"])
    con = duckdb.connect()
    reader = pa.RecordBatchReader.from_stream(dt.scan(columns=["id", "name"]))
    q = con.execute(
        "SELECT count(*), count(DISTINCT id), count(DISTINCT name) FROM reader"
    ).fetchone()
    try:
        n = dt.to_pyarrow_dataset().to_table().num_rows
        dataset = f"read {n} rows"
    except Exception as e:  # the documented refusal, not a silent misread
        dataset = f"refused: {type(e).__name__}: {e}"
    protocol = dt.protocol()
    with_dv = read_all(dt.deletion_vectors()).num_rows
    json.dump(
        {
            "rows": rows,
            "duckdb": {"count": q[0], "ids": q[1], "names": q[2]},
            "pyarrow_dataset": dataset,
            "reader_features": protocol.reader_features or [],
            "writer_features": protocol.writer_features or [],
            "min_reader": protocol.min_reader_version,
            "min_writer": protocol.min_writer_version,
            "files_with_dv": with_dv,
        },
        sys.stdout,
        default=str,
    )


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
