#!/usr/bin/env bash
# Real Debezium for the tests: PostgreSQL (Debian's packages, logical decoding on) and Kafka
# Connect in standalone mode with io.debezium:debezium-connector-postgres 3.6.1.Final, from
# Maven Central (scripts/java/debezium-pom.xml, resolved into $LAKESINK_CACHE/connect; Connect
# 4.3, the Kafka Debezium 3.6 is built against: see the pom). Tests create their own connectors
# through Connect's REST API (JsonConverter with schemas, keys and values).
#
#   scripts/debezium.sh install
#   scripts/debezium.sh start DIR KAFKA_BOOTSTRAP   # writes DIR/env
#   scripts/debezium.sh stop DIR
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAKESINK_CACHE:-$HOME/.cache/lakesink}
LIBS=$CACHE/connect/libs
CMD=${1:?usage: debezium.sh install|start|stop [DIR] [KAFKA]}
DIR=${2:-}

log() { printf '== %s\n' "$*" >&2; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

install() {
  if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
    log "installing PostgreSQL (Debian packages)"
    apt-get install -y -qq postgresql >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; }
  fi
  local stamp
  stamp=$(sha256sum "$ROOT/scripts/java/debezium-pom.xml" | cut -c1-16)
  if [ -f "$LIBS/.complete" ] && [ "$(cat "$LIBS/.complete")" = "$stamp" ]; then return 0; fi
  log "resolving Kafka Connect and Debezium's PostgreSQL connector 3.6.1.Final from Maven Central into $LIBS"
  rm -rf "$LIBS"
  mkdir -p "$LIBS"
  mvn -q -B -f "$ROOT/scripts/java/debezium-pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$LIBS" -DincludeScope=runtime >&2
  echo "$stamp" >"$LIBS/.complete"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start() {
  local kafka=${3:?KAFKA_BOOTSTRAP}
  install
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  # PostgreSQL refuses to run as root: its own user owns the cluster, reached over loopback.
  chmod o+x "$DIR" "$(dirname "$DIR")"
  local pg_port connect_port bin
  pg_port=$(free_port); connect_port=$(free_port); bin=$(pg_bin)
  # A fresh cluster each start: stop what an earlier start left running, drop its data.
  stop
  rm -rf "$DIR/pg" "$DIR/connect.offsets"
  mkdir -p "$DIR/pg"
  chown postgres "$DIR/pg"
  runuser -u postgres -- "$bin/initdb" -D "$DIR/pg/data" -U postgres --auth=trust \
    >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
  cat >>"$DIR/pg/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$DIR/pg'
wal_level = logical
max_wal_senders = 40
max_replication_slots = 40
fsync = off
EOF
  runuser -u postgres -- "$bin/pg_ctl" -D "$DIR/pg/data" -l "$DIR/pg/postgres.log" -w start >/dev/null
  echo "$pg_port" >"$DIR/pg_port"

  cat >"$DIR/connect.properties" <<EOF
bootstrap.servers=$kafka
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=true
value.converter.schemas.enable=true
offset.storage.file.filename=$DIR/connect.offsets
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:$connect_port
EOF
  cp "$ROOT/scripts/java/log4j2.yaml" "$DIR/connect-log4j2.yaml"
  nohup java -Xms128m -Xmx768m -XX:+UseSerialGC -Dlog4j2.configurationFile="$DIR/connect-log4j2.yaml" \
    -cp "$LIBS/*" org.apache.kafka.connect.cli.ConnectStandalone "$DIR/connect.properties" \
    >"$DIR/connect.log" 2>&1 &
  echo $! >"$DIR/connect.pid"
  for _ in $(seq 1 1200); do
    if curl -sf "http://127.0.0.1:$connect_port/connector-plugins" 2>/dev/null | grep -q PostgresConnector; then
      break
    fi
    if ! kill -0 "$(cat "$DIR/connect.pid")" 2>/dev/null; then
      echo "Kafka Connect exited; its log:" >&2; tail -40 "$DIR/connect.log" >&2; exit 1
    fi
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$connect_port/connector-plugins" | grep -q PostgresConnector ||
    { echo "Kafka Connect did not load the Debezium connector; its log:" >&2; tail -40 "$DIR/connect.log" >&2; exit 1; }
  cat >"$DIR/env" <<EOF
export LAKESINK_TEST_PG=postgresql://postgres@127.0.0.1:$pg_port/postgres
export LAKESINK_TEST_PG_PORT=$pg_port
export LAKESINK_TEST_CONNECT=http://127.0.0.1:$connect_port
EOF
  log "PostgreSQL on 127.0.0.1:$pg_port, Kafka Connect (Debezium) on 127.0.0.1:$connect_port"
}

stop() {
  if [ -f "$DIR/connect.pid" ]; then
    kill "$(cat "$DIR/connect.pid")" 2>/dev/null || true
    rm -f "$DIR/connect.pid"
  fi
  if [ -d "$DIR/pg/data" ]; then
    runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
  fi
}

case "$CMD" in
  install) install ;;
  start) start "$@" ;;
  stop) DIR=$(cd "${DIR:?DIR}" && pwd); stop ;;
  *) echo "usage: debezium.sh install|start|stop [DIR] [KAFKA]" >&2; exit 2 ;;
esac
