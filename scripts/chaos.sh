#!/usr/bin/env bash
# The chaos harness (tests/chaos.rs) by hand, e.g. the long mode:
#
#   scripts/chaos.sh --minutes 30 --seed 7 [--target parquet_on_moto|parquet_on_azurite|parquet_on_gcs|delta_on_moto|delta_on_moto_kip848|databend|databend_kip848]
#
# Starts the real services (scripts/services.sh), runs the chosen targets one after another
# (all by default) and prints each run's summary line; stops the services on exit. A run
# is reproducible from its seed (the stream and the fault schedule) up to process timing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${LAKESINK_CACHE:-$HOME/.cache/lakesink}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
MINUTES="" SEED=1 TARGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
export LAKESINK_CHAOS_SEED=$SEED
if [ -n "$MINUTES" ]; then export LAKESINK_CHAOS_MINUTES=$MINUTES; fi

RUN=$(mktemp -d "${TMPDIR:-/tmp}/lakesink-chaos.XXXXXX")
cleanup() {
  bash "$ROOT/scripts/services.sh" stop "$RUN" || true
  if [ "${KEEP_TEST_DIR:-0}" != 1 ]; then rm -rf "$RUN"; fi
}
trap cleanup EXIT
bash "$ROOT/scripts/services.sh" start "$RUN"
# shellcheck disable=SC1091
source "$RUN/env"
cd "$ROOT"
cargo nextest run --test chaos --test-threads 1 --no-fail-fast --success-output final \
  ${TARGET:+"chaos_$TARGET"} 2>&1 | tee "$RUN/chaos.out" | grep --line-buffered -E 'chaos summary|PASS|FAIL|panicked' || true
grep -q "FAIL" "$RUN/chaos.out" && { cat "$RUN/chaos.out" | tail -80; exit 1; }
exit 0
