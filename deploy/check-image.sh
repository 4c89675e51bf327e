#!/usr/bin/env bash
# Builds deploy/Dockerfile and checks the image: it starts a single node as user 10001, answers
# /readyz, stores a point in /data and returns it. By hand (not in CI: a release build inside
# the image takes ~10 minutes on 2 cores):
#
#   bash deploy/check-image.sh            # docker, or podman when no docker daemon answers
#
# Offline (no registry for rust:1-bookworm and debian:bookworm-slim), make the two base images
# first from Debian and the host's Rust toolchain:
#
#   SHOAL_LOCAL_BASES=1 bash deploy/check-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${ENGINE:-}" ]; then
  if docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
# Sandboxes without cgroup v2 or CAP_SYS_RESOURCE need these with podman.
PODMAN_OPTS=()
ULIMITS=()
if [[ $ENGINE == *podman ]]; then
  PODMAN_OPTS=(--runtime runc --cgroup-manager cgroupfs)
  ULIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
fi
run_engine() { "$ENGINE" "${PODMAN_OPTS[@]}" "$@"; }

if [ -n "${SHOAL_LOCAL_BASES:-}" ]; then
  root=$(mktemp -d /tmp/shoal-bases.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase bookworm "$root/slim" http://deb.debian.org/debian >/dev/null
  tar -C "$root/slim" -c . | run_engine import - docker.io/library/debian:bookworm-slim >/dev/null
  cp -a "$root/slim" "$root/rust"
  chroot "$root/rust" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev make ca-certificates' >/dev/null
  # The host's CA bundle, so that cargo in the image trusts what the host trusts (a proxy's CA).
  cp /etc/ssl/certs/ca-certificates.crt "$root/rust/etc/ssl/certs/ca-certificates.crt"
  toolchain=$(rustc --print sysroot)
  mkdir -p "$root/rust/usr/local/rustup/toolchain" "$root/rust/usr/local/cargo/bin"
  cp -a "$toolchain/bin" "$toolchain/lib" "$root/rust/usr/local/rustup/toolchain/"
  rm -rf "$root/rust/usr/local/rustup/toolchain/lib/rustlib/src"
  ln -s /usr/local/rustup/toolchain/bin/cargo /usr/local/rustup/toolchain/bin/rustc "$root/rust/usr/local/cargo/bin/"
  tar -C "$root/rust" -c . | run_engine import \
    --change "ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV CARGO_HOME=/usr/local/cargo" - docker.io/library/rust:1-bookworm >/dev/null
fi

# SKIP_BUILD=1 checks an image built before.
[ -n "${SKIP_BUILD:-}" ] || run_engine build "${ULIMITS[@]}" -f deploy/Dockerfile -t shoal:check .
echo "image size: $(run_engine image inspect shoal:check --format '{{.Size}}' | awk '{ printf "%.1f MiB", $1 / 1048576 }')"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
name=shoal-check-$$
run_engine run -d --name "$name" "${ULIMITS[@]}" -p "127.0.0.1:$port:9000" shoal:check >/dev/null
trap 'run_engine rm -f "$name" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.2; done
curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" || { run_engine logs "$name"; echo "FAIL: no /readyz"; exit 1; }
[ "$(run_engine exec "$name" id -u)" = 10001 ] || { echo "FAIL: the node does not run as 10001"; exit 1; }
curl -sf -XPOST "http://127.0.0.1:$port/write?db=d&namespace=n&precision=ms" --data-binary 'm,host=a value=42i 1000'
answer=$(curl -sf -XPOST "http://127.0.0.1:$port/query" -H 'Content-Type: application/json' \
  -d '{"db":"d","namespace":"n","queryString":"SELECT count(*) FROM m"}')
echo "$answer" | grep -q '"value":1' || { echo "FAIL: count was $answer"; exit 1; }
run_engine exec "$name" sh -c 'ls /data' | grep -q . || { echo "FAIL: nothing in /data"; exit 1; }
echo "OK: the image runs a node as 10001 that stores and answers a point in /data"
