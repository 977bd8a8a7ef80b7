#!/usr/bin/env bash
# The whole lakesink test suite against real services.
#
# Installs what is missing (idempotent), starts on free loopback ports (scripts/services.sh):
# Apache Kafka 4.4 (KRaft, from Maven Central), moto (S3 with atomic conditional writes), Azurite
# (Azure Blob), fake-gcs-server (GCS), the Databend test server; runs fmt, clippy and every test;
# stops the services on exit. Caches live outside the clone, in $LAKESINK_CACHE (default
# ~/.cache/lakesink): the Kafka jars, the Python venv, Azurite's node_modules, the Go build of
# fake-gcs-server and the cargo target dir; Maven's own cache is ~/.m2.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAKESINK_CACHE:-$HOME/.cache/lakesink}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
VENV=$CACHE/venv
NODE_DIR=$CACHE/node
mkdir -p "$CACHE"

log() { printf '\n== %s\n' "$*" >&2; }

if ! command -v openssl >/dev/null 2>&1; then
  log "installing openssl (the registry TLS test makes certificates)"
  apt-get install -y -qq openssl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq openssl; }
fi
if ! command -v curl >/dev/null 2>&1; then
  log "installing curl (scripts/debezium.sh and the Debezium test talk to Kafka Connect's REST API)"
  apt-get install -y -qq curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl; }
fi
if ! command -v cmake >/dev/null 2>&1; then
  log "installing cmake (librdkafka's build, with libcurl for OAuth/OIDC logins)"
  apt-get install -y -qq cmake >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq cmake; }
fi
if ! command -v make >/dev/null 2>&1; then
  log "installing make (jemalloc's C build, the binary's allocator)"
  apt-get install -y -qq make >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq make; }
fi
# ---- install and start the services (scripts/services.sh) in the background, stop on exit --
# On a machine with nothing cached, installing them (Maven, the Go build, pip, npm: mostly
# downloads) overlaps the Rust build below instead of adding to it.
RUN=$(mktemp -d "${TMPDIR:-/tmp}/lakesink-test.XXXXXX")
SERVICES_PID=
cleanup() {
  if [ -n "$SERVICES_PID" ]; then wait "$SERVICES_PID" 2>/dev/null || true; fi
  bash "$ROOT/scripts/services.sh" stop "$RUN" || true
  if [ "${KEEP_TEST_DIR:-0}" != 1 ]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT
log "installing and starting the services (log: $RUN/services.log)"
bash "$ROOT/scripts/services.sh" start "$RUN" >"$RUN/services.log" 2>&1 &
SERVICES_PID=$!

# The test runner, pinned: each test runs in its own process (tests that set the process
# environment rely on it). A failed install fails the run; there is no fallback runner.
NEXTEST_VERSION=0.9.151
if [ "$(cargo nextest --version 2>/dev/null | sed -n 's/^cargo-nextest \([^ ]*\).*/\1/p')" != "$NEXTEST_VERSION" ]; then
  log "installing cargo-nextest $NEXTEST_VERSION"
  # A debug build without its self-update feature: a third of the release build's time on a
  # cold machine, and a test runner needs no optimisation.
  if ! cargo install --locked --debug "cargo-nextest@$NEXTEST_VERSION" --no-default-features \
    --features default-no-update >"$RUN/nextest-install.log" 2>&1; then
    cat "$RUN/nextest-install.log" >&2
    echo "cargo-nextest $NEXTEST_VERSION did not install (its log is above)" >&2
    exit 1
  fi
fi

# ---- checks and tests ----------------------------------------------------------------------
cd "$ROOT"
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
log "building the tests"
cargo nextest run --workspace --no-run "$@"
log "waiting for the services"
if ! wait "$SERVICES_PID"; then
  SERVICES_PID=
  cat "$RUN/services.log" >&2
  echo "the services did not start (their log is above)" >&2
  exit 1
fi
SERVICES_PID=
tail -n 20 "$RUN/services.log" >&2
# shellcheck disable=SC1091
source "$RUN/env"

log "tests"
cargo nextest run --workspace --no-fail-fast --test-threads 4 -E 'not binary(chaos)' "$@"
# The chaos harness (short mode, 45 s per target) runs alone: three lakesink processes, a
# producer and fault proxies on 2 cores. LAKESINK_CHAOS=0 skips it. A failed target fails the
# run: no retries.
if [ "${LAKESINK_CHAOS:-1}" != 0 ]; then
  log "chaos harness (short mode)"
  cargo nextest run --no-fail-fast --test chaos --test-threads 1 \
    --success-output final --failure-output immediate-final "$@"
fi
log "all tests passed"
