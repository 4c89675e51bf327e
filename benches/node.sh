# Sourced by the single-build scripts (cpu_per_line.sh, groupby.sh): starts the Shoal binary
# $BIN alone on a fresh data dir, sets PID and ADDR, and stops it and removes the dir on exit.
DIR=$(mktemp -d /tmp/shoal-cpu.XXXXXX)
"$BIN" start --set shoal.data-dir="$DIR" --set shoal.http.port=0 --set shoal.node.id=bench \
  --set shoal.gossip.port=0 --set shoal.log-level=warn > "$DIR.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DIR" "$DIR.log"' EXIT
for _ in $(seq 1 100); do [ -s "$DIR/http.addr" ] && break; sleep 0.1; done
[ -s "$DIR/http.addr" ] || { echo "the node did not start: $(cat "$DIR.log")" >&2; exit 1; }
ADDR=$(cat "$DIR/http.addr")
