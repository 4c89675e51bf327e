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
source "$ROOT/benches/node.sh"
# wrk stops sending after 10,000 answers but runs on for its duration.
BENCH_REQUESTS=10000 BENCH_BASE_S=$(( $(date +%s) - 100000 )) BENCH_PATH="/write?db=bench&namespace=bench" \
  wrk -t1 -c4 -d20s --timeout 30s -s "$ROOT/benches/lineproto.lua" "http://$ADDR" | grep RESULT
query='{"db":"bench","namespace":"bench","queryString":"SELECT avg(value) FROM cpu_usage GROUP BY region"}'
for _ in 1 2 3 4 5; do
  curl -sf -o /dev/null -w "%{time_total} s\n" -XPOST "http://$ADDR/query" -H 'Content-Type: application/json' -d "$query"
done
