#!/usr/bin/env bash
# Installs (only what is missing) and starts the real services the integration tests need, on
# free loopback ports: Apache Kafka 4.4 (one KRaft node, scripts/kafka.sh), PostgreSQL and Kafka
# Connect with Debezium (scripts/debezium.sh), moto (S3), Azurite (Azure Blob), fake-gcs-server
# (GCS, tests/gcs), the Databend test server (tests/py/databend_server.py over the embedded
# Databend engine).
#
#   scripts/services.sh start DIR   # logs and data in DIR; writes DIR/env (source it)
#   scripts/services.sh stop DIR
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAKESINK_CACHE:-$HOME/.cache/lakesink}
VENV=$CACHE/venv
NODE_DIR=$CACHE/node
CMD=${1:?usage: services.sh start|stop DIR}
RUN=${2:?usage: services.sh start|stop DIR}
mkdir -p "$CACHE" "$RUN"

log() { printf '== %s\n' "$*" >&2; }

if [ "$CMD" = stop ]; then
  if [ -f "$RUN/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$RUN/pids"
    rm -f "$RUN/pids"
  fi
  if [ -d "$RUN/debezium" ]; then bash "$ROOT/scripts/debezium.sh" stop "$RUN/debezium"; fi
  if [ -d "$RUN/kafka" ]; then bash "$ROOT/scripts/kafka.sh" stop "$RUN/kafka"; fi
  exit 0
fi

# ---- install (only what is missing) -------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating Python venv in $VENV"
  python3 -m venv "$VENV"
fi
# Exactly the pinned and hashed set (scripts/requirements-test.txt); installed again whenever
# that file changes. A failed install fails the start.
REQUIREMENTS=$ROOT/scripts/requirements-test.txt
STAMP=$VENV/.lakesink-requirements
if [ "$(cat "$STAMP" 2>/dev/null)" != "$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)" ]; then
  log "installing the Python test tools (scripts/requirements-test.txt: moto, pyarrow, duckdb, boto3, azure-storage-blob, confluent-kafka, deltalake, databend, pinned with hashes)"
  "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes -r "$REQUIREMENTS"
  sha256sum "$REQUIREMENTS" | cut -d' ' -f1 >"$STAMP"
fi
if [ ! -x "$NODE_DIR/node_modules/.bin/azurite-blob" ]; then
  log "installing Azurite into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" azurite@3.37.0 >/dev/null
fi
bash "$ROOT/scripts/kafka.sh" install
bash "$ROOT/scripts/debezium.sh" install
GO_DIR=$CACHE/go
GCS_BIN=$GO_DIR/bin/lakesink-gcs
GCS_STAMP=$(cat "$ROOT/tests/gcs/main.go" "$ROOT/tests/gcs/go.mod" "$ROOT/tests/gcs/go.sum" | sha256sum | cut -c1-16)
if [ ! -x "$GCS_BIN" ] || [ "$(cat "$GCS_BIN.stamp" 2>/dev/null)" != "$GCS_STAMP" ]; then
  log "building the GCS test server (fake-gcs-server v1.56.1 from the Go module proxy, tests/gcs) into $GO_DIR"
  command -v go >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq golang-go >/dev/null; }
  (cd "$ROOT/tests/gcs" && GOPATH=$GO_DIR GOMODCACHE=$GO_DIR/mod GOCACHE=$GO_DIR/build GOFLAGS=-mod=mod \
    go build -o "$GCS_BIN" .)
  echo "$GCS_STAMP" >"$GCS_BIN.stamp"
fi

# ---- start services ------------------------------------------------------------------------

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { # name port
  # Up to 60 s: on 2 busy cores the Databend engine and node take a while to start.
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not open port $2; its log:" >&2; cat "$RUN/$1.log" >&2 || true; exit 1
}

# Kafka starts in the background (the JVM takes a few seconds) while the others start.
bash "$ROOT/scripts/kafka.sh" start "$RUN/kafka" >"$RUN/kafka-start.log" 2>&1 &
KAFKA_STARTER=$!

S3_PORT=$(free_port)
log "starting moto (S3) on 127.0.0.1:$S3_PORT"
# moto with atomic conditional writes (see tests/py/moto_server.py).
"$VENV/bin/python" -W ignore "$ROOT/tests/py/moto_server.py" -H 127.0.0.1 -p "$S3_PORT" >"$RUN/moto.log" 2>&1 &
echo $! >>"$RUN/pids"

AZ_PORT=$(free_port)
log "starting Azurite (Blob) on 127.0.0.1:$AZ_PORT"
mkdir -p "$RUN/azurite"
"$NODE_DIR/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$AZ_PORT" \
  --location "$RUN/azurite" --loose --skipApiVersionCheck --disableTelemetry >"$RUN/azurite.log" 2>&1 &
echo $! >>"$RUN/pids"

GCS_PORT=$(free_port)
log "starting fake-gcs-server (GCS, with object_store's XML API: tests/gcs) on 127.0.0.1:$GCS_PORT"
"$GCS_BIN" -host 127.0.0.1 -port "$GCS_PORT" >"$RUN/gcs.log" 2>&1 &
echo $! >>"$RUN/pids"
# object_store (and so python deltalake) reaches a GCS emulator through a service-account file
# that names its base URL and turns OAuth off.
printf '{"gcs_base_url": "http://127.0.0.1:%s", "disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}\n' \
  "$GCS_PORT" >"$RUN/gcs-account.json"

DATABEND_PORT=$(free_port)
log "starting the Databend test server (embedded Databend engine) on 127.0.0.1:$DATABEND_PORT"
"$VENV/bin/python" -W ignore "$ROOT/tests/py/databend_server.py" --port "$DATABEND_PORT" \
  --dir "$RUN/databend" --user lakesink --password databend-test-secret >"$RUN/databend.log" 2>&1 &
echo $! >>"$RUN/pids"

rm -f "$RUN/env"
wait_port databend "$DATABEND_PORT"
if ! wait "$KAFKA_STARTER"; then cat "$RUN/kafka-start.log" >&2; exit 1; fi
# PostgreSQL and Kafka Connect (Debezium) need the broker.
if ! bash "$ROOT/scripts/debezium.sh" start "$RUN/debezium" "$(sed -n 's/^export LAKESINK_TEST_KAFKA=//p' "$RUN/kafka/env")" \
  >"$RUN/debezium-start.log" 2>&1; then
  cat "$RUN/debezium-start.log" >&2; exit 1
fi
wait_port moto "$S3_PORT"
wait_port azurite "$AZ_PORT"
wait_port gcs "$GCS_PORT"

cat "$RUN/kafka/env" >>"$RUN/env"
cat "$RUN/debezium/env" >>"$RUN/env"
echo "export LAKESINK_TEST_S3=http://127.0.0.1:$S3_PORT" >>"$RUN/env"
echo "export LAKESINK_TEST_AZURE=http://127.0.0.1:$AZ_PORT/devstoreaccount1" >>"$RUN/env"
echo "export LAKESINK_TEST_GCS=http://127.0.0.1:$GCS_PORT" >>"$RUN/env"
echo "export LAKESINK_TEST_GCS_ACCOUNT=$RUN/gcs-account.json" >>"$RUN/env"
echo "export LAKESINK_TEST_DATABEND=http://lakesink:databend-test-secret@127.0.0.1:$DATABEND_PORT" >>"$RUN/env"
echo "export LAKESINK_TEST_PYTHON=$VENV/bin/python" >>"$RUN/env"
echo "export LAKESINK_TEST_DIR=$RUN" >>"$RUN/env"

cat "$RUN/env" >&2
