#!/usr/bin/env bash
# The node-wide memtable budget (shoal.storage.memtable-budget-points) where it matters: many
# shards written at once. Loads BENCH_LINES lines (default 10,000,000) spread over BENCH_METRICS
# metrics (default 100) of 20 hosts each, in time order (every metric's memtable grows
# together), as 100,000-line bodies over 2 streams, into a single node: ROUNDS (default 2)
# times with the default budget and with one too large to matter, alternated. Prints lines/s,
# the server's CPU seconds and peak RSS of each load.
#
#   bash benches/memtable_budget.sh     # by hand, not in CI
set -euo pipefail
cd "$(dirname "$0")/.."
LINES=${BENCH_LINES:-10000000}
METRICS=${BENCH_METRICS:-100}
ROUNDS=${ROUNDS:-2}
SERIES=$(( METRICS * 20 ))
BODY=100000
WORK=$(mktemp -d /tmp/shoal-budget.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl >/dev/null; }
cargo build --release --quiet
SHOAL=$(realpath ./target/release/shoal)

SECONDS_SPAN=$(( (LINES + SERIES - 1) / SERIES ))
BASE_S=$(( ($(date +%s) - 3600 - SECONDS_SPAN) / 3600 * 3600 ))
mkdir -p "$WORK/data"
awk -v lines="$LINES" -v series="$SERIES" -v metrics="$METRICS" -v base="$BASE_S" -v body="$BODY" -v dir="$WORK/data" 'BEGIN {
  srand(19); file = 0; n = 0
  for (i = 0; i < lines; i++) {
    if (n % body == 0) { if (n) close(out); out = sprintf("%s/%05d.lp", dir, file++) }
    s = i % series; t = base + int(i / series)
    printf "m%d,host=h%d value=%.2f %d\n", s % metrics, int(s / metrics), rand() * 100, t > out
    n++
  }
}'

run() { # budget -> prints one line
  local budget=$1 dir="$WORK/node" pid start end
  rm -rf "$dir"
  "$SHOAL" start --set shoal.data-dir="$dir" --set shoal.http.port=0 --set shoal.gossip.port=0 \
    --set shoal.log-level=warn --set shoal.storage.memtable-budget-points="$budget" > "$WORK/node.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do [ -s "$dir/http.addr" ] && break; sleep 0.1; done
  local url="http://$(cat "$dir/http.addr")"
  for _ in $(seq 1 300); do curl -sf -o /dev/null "$url/readyz" && break; sleep 0.1; done
  start=$(date +%s.%N)
  ls "$WORK"/data/*.lp | xargs -P2 -I{} sh -c 'out=$(curl -s -w " %{http_code}" --data-binary @"{}" "'"$url"'/write?db=bench&namespace=bench&precision=s"); case "$out" in *" 204") ;; *) echo "load failed: $out" | head -c 500 >&2 ;; esac'
  end=$(date +%s.%N)
  local cpu rss
  cpu=$(awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$pid/stat")
  rss=$(awk '/VmHWM/ { print int($2 / 1024) }' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  awk -v l="$LINES" -v s="$start" -v e="$end" -v b="$budget" -v c="$cpu" -v r="$rss" \
    'BEGIN { printf "budget %-11s %9.0f lines/s   CPU %6s s   peak RSS %5s MiB\n", b, l / (e - s), c, r }'
}

echo "$LINES lines over $METRICS metrics of 20 hosts each"
for _ in $(seq 1 "$ROUNDS"); do
  run 1000000000
  run 4000000
done
