#!/usr/bin/env bash
# The images' default base (BASE in deploy/Containerfile*): Debian bookworm's minimal system
# (debootstrap --variant=minbase) with its Python 3.11 and venv module, imported into podman's
# storage as IMAGE. Made here because no image registry is reachable from the machines that
# build it; where one is, build with --build-arg BASE=docker.io/library/python:3.11-slim-bookworm
# instead. Does nothing when IMAGE is in podman's storage already, made by this same script.
#   deploy/base-image.sh [IMAGE]        (as root: debootstrap needs it)
set -euo pipefail

image="${1:-localhost/rnnserve-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
here="$(cd "$(dirname "$0")" && pwd)"
work="${BASE_IMAGE_WORKDIR:-$here/../build/base-image}"
# The script's own digest, as a label: an image made by an older version is made again.
recipe="$(sha256sum "$0" | cut -d' ' -f1)"

if [ "$(podman image inspect --format '{{index .Labels "org.rnnserve.base-recipe"}}' "$image" \
        2>/dev/null)" = "$recipe" ]; then
    echo "base-image.sh: $image is already in podman's storage"
    exit 0
fi

rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror"
# What a server never reads: package caches and lists, manuals, translations (about 50 MB;
# the copyright files stay).
rootfs="$work/rootfs"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL org.rnnserve.base-recipe=$recipe" \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv bookworm $mirror" \
    - "$image"
