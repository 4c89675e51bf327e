#!/usr/bin/env bash
# Issue 19's side-by-side benchmark: one data set into Shoal (a single node, then a 3-node RF 2
# cluster), VictoriaMetrics and InfluxDB 1.x, one system at a time on this machine. Prints, per
# system: load rate, bytes per point on disk (all files, after compaction), peak RSS, and the
# median of 5 runs of five queries (run interleaved across the systems, see below); then
# Shoal's ratios to VictoriaMetrics, and the cluster's to the single node.
#
# Data set: BENCH_SERIES series (host × region, default 400), one point per series per
# second, random two-decimal values, BENCH_LINES lines (default 10,000,000) loaded as
# 100,000-line bodies over 2 streams. The 20,000-series variant:
#   BENCH_SERIES=20000 bash benches/queries.sh
# Queries: avg by region over all points; max for one host; avg per 1h over all points; avg
# per 1m over the last hour by host; last value per host.
#
#   bash benches/queries.sh     # by hand, not in CI; installs what it needs (root)
set -euo pipefail
cd "$(dirname "$0")/.."
LINES=${BENCH_LINES:-10000000}
SERIES=${BENCH_SERIES:-400}
BODY=100000
WORK=$(mktemp -d /tmp/shoal-queries.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

need=()
command -v victoria-metrics >/dev/null || need+=(victoria-metrics)
command -v influxd >/dev/null || need+=(influxdb)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
cargo build --release --quiet
SHOAL=$(realpath ./target/release/shoal)

# The data: second t holds one point of each series; it ends an hour or more before now and
# starts on the hour, so that whether it straddles an hour (a second block per series where
# blocks are cut by the hour) does not depend on when the benchmark runs.
SECONDS_SPAN=$(( (LINES + SERIES - 1) / SERIES ))
BASE_S=$(( ($(date +%s) - 3600 - SECONDS_SPAN) / 3600 * 3600 ))
END_S=$(( BASE_S + SECONDS_SPAN ))
mkdir -p "$WORK/data"
awk -v lines="$LINES" -v series="$SERIES" -v base="$BASE_S" -v body="$BODY" -v dir="$WORK/data" 'BEGIN {
  srand(19); file = 0; n = 0
  for (i = 0; i < lines; i++) {
    if (n % body == 0) { if (n) close(out); out = sprintf("%s/%05d.lp", dir, file++) }
    s = i % series; t = base + int(i / series)
    printf "cpu,host=h%d,region=r%d value=%.2f %d\n", s, s % 8, rand() * 100, t > out
    n++
  }
}'
FROM_MS=$(( BASE_S * 1000 )); TO_MS=$(( (END_S + 1) * 1000 )); LAST_HOUR_MS=$(( TO_MS - 3600 * 1000 ))

wait_http() { for _ in $(seq 1 300); do curl -sf -o /dev/null "$1" && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }

load() { # url-prefix... (bodies go round-robin over them, 2 streams) -> prints lines/s
  local urls=("$@") start end
  start=$(date +%s.%N)
  ls "$WORK"/data/*.lp | awk -v n="${#urls[@]}" '{ print NR % n, $0 }' | \
    while read -r i f; do echo "${urls[$i]} $f"; done | \
    xargs -P2 -L1 sh -c 'out=$(curl -s -w " %{http_code}" --data-binary @"$1" "$0"); case "$out" in *" 204") ;; *) echo "load failed: $0 $1: $out" | head -c 1000 >&2; echo >&2 ;; esac'
  end=$(date +%s.%N)
  echo "$LINES $start $end" | awk '{ printf "%.0f", $1 / ($3 - $2) }'
}

# A query's time is curl's, from connecting to the last byte of the answer: timing the curl
# process as well added ~7 ms of start-up to every system's figure, which hid the differences
# between answers that take a few milliseconds. The answer goes to /dev/null: written to a
# file, the 26 MB of Shoal's per-1m-by-host answer at 20,000 series took 35-47 ms of curl's
# timer against 7-10 ms, varying with the page cache rather than with the server.
timed_curl() { curl -sf -o /dev/null -w '%{time_total}\n' "$@"; }

peak_rss_mib() { awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
bytes_per_point() { du -sb "$@" | awk -v n="$LINES" '{ s += $1 } END { printf "%.2f", s / n }'; }
stop() { kill "$@"; wait "$@" 2>/dev/null || true; }
# Waits until the directories' size has held still for 6 s (3 samples 2 s apart; at most 3
# minutes), so that every system is measured after its compactions rather than in the middle
# of one: VictoriaMetrics measured 5 s after a flush read 2.32 bytes a point at 20,000 series,
# 2.62 five seconds later (merged parts written, the old ones not yet removed), 2.21 merged.
# VictoriaMetrics is asked to merge its parts now (force_merge), as it does on its own in time.
settle() {
  local prev=-1 cur same=0
  for _ in $(seq 1 90); do
    cur=$(du -sb "$@" | awk '{ s += $1 } END { print s }')
    if [ "$cur" = "$prev" ]; then same=$((same + 1)); [ $same -ge 3 ] && return 0; else same=0; fi
    prev=$cur; sleep 2
  done
}

# Two phases. The loads run one system at a time, alone on the machine: load rate, bytes per
# point once compacted, peak RSS. Then every system is started again on its data and the
# queries run interleaved (round r of query q on each system in turn, five rounds), so that
# the state of the machine (CPU caches and frequency, the page cache, whatever ran just before)
# weighs on every system alike. Run one system after another, sub-millisecond answers moved by
# a third with what had run before: a ratio of two systems' 0.4 ms answers said more about
# the order than about the systems. Peak RSS is the larger of the two phases' (queries count).
declare -A LOAD_RATE BYTES RSS_LOAD PIDS

# --- Shoal: a single node, then a 3-node RF 2 cluster ---
start_shoal() { # dir port gossip-port [seed] -> pid in SHOAL_PID
  mkdir -p "$1"
  local seed=()
  [ -n "${4:-}" ] && seed=(--set "shoal.cluster.seeds=[\"127.0.0.1:$4\"]")
  "$SHOAL" start --set "shoal.data-dir=$1" --set shoal.http.port="$2" --set shoal.gossip.port="$3" \
    --set shoal.node.id="n$2" --set shoal.storage.flush-interval=5s --set shoal.log-level=warn \
    --set shoal.cluster.replication-factor="${RF:-1}" "${seed[@]}" >> "$1.log" 2>&1 &
  SHOAL_PID=$!
  wait_http "http://127.0.0.1:$2/readyz"
}
start_cluster() { # -> pids in P1 P2 P3, once every node sees three alive
  RF=2 start_shoal "$WORK/c1" 19101 19201; P1=$SHOAL_PID
  RF=2 start_shoal "$WORK/c2" 19102 19202 19201; P2=$SHOAL_PID
  RF=2 start_shoal "$WORK/c3" 19103 19203 19201; P3=$SHOAL_PID
  local p
  for p in 19101 19102 19103; do
    for _ in $(seq 1 100); do
      [ "$(curl -sf http://127.0.0.1:$p/cluster/members | grep -o '"alive"' | wc -l)" -ge 3 ] && break; sleep 0.2
    done
  done
}
start_shoal "$WORK/shoal" 19100 19200
LOAD_RATE[shoal]=$(load "http://127.0.0.1:19100/write?db=bench&namespace=bench&precision=s")
sleep 6  # past the flush interval: every point in segments, the WAL gone
settle "$WORK/shoal"
BYTES[shoal]=$(bytes_per_point "$WORK/shoal"); RSS_LOAD[shoal]=$(peak_rss_mib $SHOAL_PID)
stop $SHOAL_PID

start_cluster
LOAD_RATE[shoal-3xRF2]=$(load "http://127.0.0.1:19101/write?db=bench&namespace=bench&precision=s" \
  "http://127.0.0.1:19102/write?db=bench&namespace=bench&precision=s" \
  "http://127.0.0.1:19103/write?db=bench&namespace=bench&precision=s")
sleep 6
settle "$WORK/c1" "$WORK/c2" "$WORK/c3"
BYTES[shoal-3xRF2]=$(bytes_per_point "$WORK/c1" "$WORK/c2" "$WORK/c3")
RSS_LOAD[shoal-3xRF2]=$(( $(peak_rss_mib $P1) + $(peak_rss_mib $P2) + $(peak_rss_mib $P3) ))
stop $P1 $P2 $P3

# --- VictoriaMetrics: Influx line protocol in, PromQL out ---
start_vm() {
  victoria-metrics -storageDataPath="$WORK/vm" -httpListenAddr=127.0.0.1:18428 -retentionPeriod=100y \
    -loggerLevel=ERROR >> "$WORK/vm.log" 2>&1 &
  VM_PID=$!
  wait_http http://127.0.0.1:18428/health
}
start_vm
LOAD_RATE[victoria]=$(load "http://127.0.0.1:18428/write?precision=s")
curl -sf -o /dev/null http://127.0.0.1:18428/internal/force_flush || true
curl -sf -o /dev/null http://127.0.0.1:18428/internal/force_merge || true
settle "$WORK/vm"
BYTES[victoria]=$(bytes_per_point "$WORK/vm"); RSS_LOAD[victoria]=$(peak_rss_mib $VM_PID)
stop $VM_PID

# --- InfluxDB 1.x: InfluxQL ---
cat > "$WORK/influxdb.conf" <<EOF
reporting-disabled = true
bind-address = "127.0.0.1:18088"
[meta]
  dir = "$WORK/influx/meta"
[data]
  dir = "$WORK/influx/data"
  wal-dir = "$WORK/influx/wal"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:18086"
  log-enabled = false
EOF
start_influx() {
  influxd -config "$WORK/influxdb.conf" >> "$WORK/influxd.log" 2>&1 &
  INFLUX_PID=$!
  wait_http http://127.0.0.1:18086/ping
}
start_influx
curl -sf -o /dev/null -XPOST http://127.0.0.1:18086/query --data-urlencode "q=CREATE DATABASE bench"
LOAD_RATE[influxdb]=$(load "http://127.0.0.1:18086/write?db=bench&precision=s")
settle "$WORK/influx"
BYTES[influxdb]=$(bytes_per_point "$WORK/influx"); RSS_LOAD[influxdb]=$(peak_rss_mib $INFLUX_PID)
stop $INFLUX_PID

# --- Queries: every system up again on its data, the five queries interleaved ---
start_shoal "$WORK/shoal" 19100 19200; PIDS[shoal]=$SHOAL_PID
start_cluster; PIDS[shoal-3xRF2]="$P1 $P2 $P3"
start_vm; PIDS[victoria]=$VM_PID
start_influx; PIDS[influxdb]=$INFLUX_PID
sleep 5  # the restarted cluster's first digest exchanges

shoal_sql() { # addr sql
  timed_curl -XPOST "http://$1/query" -H 'Content-Type: application/json' \
    -d "{\"db\":\"bench\",\"namespace\":\"bench\",\"queryString\":\"$2\"}"
}
shoal_nth() { # addr n
  case $2 in
    1) shoal_sql "$1" "SELECT avg(value) FROM cpu GROUP BY region" ;;
    2) shoal_sql "$1" "SELECT max(value) FROM cpu WHERE host = 'h7'" ;;
    3) shoal_sql "$1" "SELECT avg(value) FROM cpu GROUP BY INTERVAL 1h" ;;
    4) shoal_sql "$1" "SELECT avg(value) FROM cpu WHERE timestamp >= $LAST_HOUR_MS GROUP BY host, INTERVAL 1m" ;;
    5) shoal_sql "$1" "SELECT last(value) FROM cpu GROUP BY host" ;;
  esac
}
RANGE="$(( SECONDS_SPAN + 1 ))s"; AT=$(( END_S + 1 ))
vm_query() { timed_curl -G http://127.0.0.1:18428/api/v1/query --data-urlencode "query=$1" --data-urlencode "time=$AT"; }
vm_range() { timed_curl -G http://127.0.0.1:18428/api/v1/query_range --data-urlencode "query=$1" \
  --data-urlencode "start=$2" --data-urlencode "end=$AT" --data-urlencode "step=$3"; }
vm_nth() { # n
  case $1 in
    1) vm_query "sum by (region) (sum_over_time(cpu_value[$RANGE])) / sum by (region) (count_over_time(cpu_value[$RANGE]))" ;;
    2) vm_query "max_over_time(cpu_value{host=\"h7\"}[$RANGE])" ;;
    3) vm_range "sum(sum_over_time(cpu_value[1h])) / sum(count_over_time(cpu_value[1h]))" "$BASE_S" 1h ;;
    4) vm_range "avg by (host) (avg_over_time(cpu_value[1m]))" "$(( AT - 3600 ))" 1m ;;
    5) vm_query "last_over_time(cpu_value[$RANGE])" ;;
  esac
}
influxql() { timed_curl -G http://127.0.0.1:18086/query --data-urlencode db=bench --data-urlencode "q=$1"; }
W="time >= ${FROM_MS}ms AND time < ${TO_MS}ms"
influx_nth() { # n
  case $1 in
    1) influxql "SELECT mean(value) FROM cpu WHERE $W GROUP BY region" ;;
    2) influxql "SELECT max(value) FROM cpu WHERE host = 'h7' AND $W" ;;
    3) influxql "SELECT mean(value) FROM cpu WHERE $W GROUP BY time(1h)" ;;
    4) influxql "SELECT mean(value) FROM cpu WHERE time >= ${LAST_HOUR_MS}ms AND time < ${TO_MS}ms GROUP BY time(1m), host" ;;
    5) influxql "SELECT last(value) FROM cpu WHERE $W GROUP BY host" ;;
  esac
}
for _ in 1 2 3 4 5; do
  for q in 1 2 3 4 5; do
    echo "shoal $q $(shoal_nth 127.0.0.1:19100 $q)"
    echo "shoal-3xRF2 $q $(shoal_nth 127.0.0.1:19101 $q)"
    echo "victoria $q $(vm_nth $q)"
    echo "influxdb $q $(influx_nth $q)"
  done
done > "$WORK/timings"
median5() { # system query -> median seconds of its 5 runs
  awk -v s="$1" -v q="$2" '$1 == s && $2 == q { print $3 }' "$WORK/timings" | sort -g | sed -n 3p
}
peak_rss_both() { # system -> the larger peak RSS (MiB, all its processes) of the two phases
  local q=0 pid
  for pid in ${PIDS[$1]}; do q=$(( q + $(peak_rss_mib "$pid") )); done
  echo $(( q > ${RSS_LOAD[$1]} ? q : ${RSS_LOAD[$1]} ))
}

printf "%-14s %18s %11s %10s  %8s %8s %8s %8s %8s\n" system load size peak_rss by_region one_host per_1h 1m_by_host last
for s in shoal shoal-3xRF2 victoria influxdb; do
  row=("$s" "${LOAD_RATE[$s]}" "${BYTES[$s]}" "$(peak_rss_both "$s")" \
    "$(median5 "$s" 1)" "$(median5 "$s" 2)" "$(median5 "$s" 3)" "$(median5 "$s" 4)" "$(median5 "$s" 5)")
  printf "%-14s %10s lines/s %6s B/pt %6s MiB  %8.4f %8.4f %8.4f %8.4f %8.4f\n" "${row[@]}"
  echo "${row[@]}" >> "$WORK/results"
done
for s in shoal shoal-3xRF2 victoria influxdb; do stop ${PIDS[$s]}; done

# --- Ratios to VictoriaMetrics (load: higher is better; the rest: lower is better) ---
echo
echo "Shoal / VictoriaMetrics ($LINES lines, $SERIES series):"
awk '$1 == "victoria" { for (i = 2; i <= 9; i++) vm[i] = $i }
     $1 ~ /^shoal/ { rows[$1] = $0 }
     END {
       split("load bytes/pt peak_rss by_region one_host per_1h 1m_by_host last", names, " ")
       for (r in rows) {
         split(rows[r], f, " "); line = sprintf("%-12s", r)
         for (i = 2; i <= 9; i++) line = line sprintf(" %s %.3fx", names[i - 1], f[i] / vm[i])
         print line
       }
     }' "$WORK/results"
awk '$1 == "shoal" { for (i = 5; i <= 9; i++) one[i] = $i }
     $1 == "shoal-3xRF2" { for (i = 5; i <= 9; i++) three[i] = $i }
     END {
       split("by_region one_host per_1h 1m_by_host last", names, " ")
       line = "cluster / single node:"
       for (i = 5; i <= 9; i++) line = line sprintf(" %s %.3fx", names[i - 4], three[i] / one[i])
       print line
     }' "$WORK/results"
