#!/bin/bash
# Server CPU per ingested line: starts the given Shoal binary alone on a fresh data dir, runs the
# ingest benchmark's wrk load against it (1 thread, 4 connections, 1000-line bodies, 400 series,
# 2 fields) for DUR seconds (default 20), and prints lines/s and µs of server CPU (user + system,
# from /proc/<pid>/stat) per line. CPU per line moves less than lines/s from run to run, so
# compare two builds by alternating runs of this script:
#   bash benches/cpu_per_line.sh /tmp/shoal-before; bash benches/cpu_per_line.sh target/release/shoal
# It also prints WAL fsyncs per request. BENCH_MEASUREMENTS=N spreads the series over N
# measurements (2N metrics, so 2N shards per request; default 1).
# Needs wrk (benches/ingest.sh installs it).
set -euo pipefail
BIN=$(realpath "$1")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
source "$ROOT/benches/node.sh"
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
before=$(ticks)
result=$(BENCH_BASE_S=$(( $(date +%s) - 100000 )) BENCH_PATH="/write?db=bench&namespace=bench" \
  wrk -t1 -c4 -d"${DUR:-20}s" --timeout 30s -s "$ROOT/benches/lineproto.lua" "http://$ADDR" | grep RESULT)
after=$(ticks)
fsyncs=$(curl -s "http://$ADDR/metrics" | awk '/^shoal_wal_fsync_seconds_count/ {print $2}')
echo "$result" | awk -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v name="$(basename "$BIN")" \
  -v fsyncs="$fsyncs" '{
  split($2, r, "="); split($3, d, "=");
  lines = r[2] * 1000;
  printf "%-14s %9.0f lines/s  %.3f us cpu/line  %.2f fsyncs/request\n", name, lines / (d[2] / 1e6),
    ticks / hz * 1e6 / lines, fsyncs / r[2] }'
