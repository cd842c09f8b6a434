#!/usr/bin/env bash
# Makes the local base images that the container tests build from, since no image can be
# pulled here (users build with the usual public bases instead, see deploy/README.md):
#   lazyserve-base:<suite>   a minimal Debian from debootstrap, for the runtime stage and etcd
#   lazyserve-rust:local     that plus a C compiler, protoc (with the well-known protos)
#                            and this machine's Rust toolchain, for the builder stage
# Idempotent: an image that exists is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

suite=$(. /etc/os-release && echo "$VERSION_CODENAME")
# The same Debian mirror this machine's apt uses.
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
if ! docker image inspect "lazyserve-base:$suite" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { $sudo apt-get update -qq; DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap; }
  rootfs=$(mktemp -d)
  trap '$sudo rm -rf "$rootfs"' EXIT
  $sudo debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$mirror" >/dev/null
  # This machine's own CA certificates (an egress proxy that re-signs TLS, for one) go in
  # too, so that apt, cargo and pip inside the images trust what the host trusts.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    $sudo cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    $sudo chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  $sudo rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  $sudo tar -C "$rootfs" -c . | docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "lazyserve-base:$suite"
  echo "made lazyserve-base:$suite"
fi

if ! docker image inspect lazyserve-rust:local >/dev/null 2>&1; then
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  tar -C "$(rustc --print sysroot)" -cf "$ctx/toolchain.tar" bin lib
  cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM lazyserve-base:$suite
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev protobuf-compiler libprotobuf-dev \\
    && rm -rf /var/lib/apt/lists/*
ADD toolchain.tar /usr/local/rust/
ENV PATH=/usr/local/rust/bin:\$PATH CARGO_HOME=/usr/local/cargo
DOCKERFILE
  docker build -q -t lazyserve-rust:local "$ctx"
  echo "made lazyserve-rust:local ($(rustc --version))"
fi
