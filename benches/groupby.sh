#!/bin/bash
# Group-by latency of one Shoal build: starts the given binary alone on a fresh data dir, loads
# exactly 10,000 requests of the ingest benchmark's stream (10M lines, so 10M points per field
# metric) with wrk (1 thread, 4 connections), then times `SELECT avg(value) FROM cpu_usage
# GROUP BY region` five times through /query. Compare builds by running it for each:
#   bash benches/groupby.sh /tmp/shoal-before; bash benches/groupby.sh target/release/shoal
# Needs wrk (benches/ingest.sh installs it).
set -euo pipefail
BIN=$(realpath "$1")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(mktemp -d /tmp/shoal-cpu.XXXXXX)
"$BIN" start --set shoal.data-dir="$DIR" --set shoal.http.port=0 --set shoal.node.id=bench \
  --set shoal.gossip.port=0 --set shoal.log-level=warn > "$DIR.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR" "$DIR.log"' EXIT
for _ in $(seq 1 100); do [ -s "$DIR/http.addr" ] && break; sleep 0.1; done
ADDR=$(cat "$DIR/http.addr")
# wrk stops sending after 10,000 answers but runs on for its duration.
BENCH_REQUESTS=10000 BENCH_BASE_S=$(( $(date +%s) - 100000 )) BENCH_PATH="/write?db=bench&namespace=bench" \
  wrk -t1 -c4 -d20s --timeout 30s -s "$ROOT/benches/lineproto.lua" "http://$ADDR" | grep RESULT
query='{"db":"bench","namespace":"bench","queryString":"SELECT avg(value) FROM cpu_usage GROUP BY region"}'
for _ in 1 2 3 4 5; do
  curl -sf -o /dev/null -w "%{time_total} s\n" -XPOST "http://$ADDR/query" -H 'Content-Type: application/json' -d "$query"
done
