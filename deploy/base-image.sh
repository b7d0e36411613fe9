#!/usr/bin/env bash
# The images' default base (BASE in deploy/Containerfile*): Debian bookworm's minimal system
# (debootstrap --variant=minbase) with its Python 3.11 and venv, imported into podman's storage
# as IMAGE. Made here because no image registry is reachable from the machines that build it;
# where one is, build with --build-arg BASE=docker.io/library/python:3.11-slim-bookworm
# instead. Does nothing when IMAGE is already in podman's storage.
#   deploy/base-image.sh [IMAGE]        (as root: debootstrap needs it)
set -euo pipefail

image="${1:-localhost/rnnserve-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
work="${BASE_IMAGE_WORKDIR:-build/base-image}"

if podman image exists "$image"; then
    echo "base-image.sh: $image is already in podman's storage"
    exit 0
fi

rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/rootfs" "$mirror"
# The package caches and lists are the builder's, not the image's.
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
tar --numeric-owner -C "$work/rootfs" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase --include=python3,python3-venv bookworm $mirror" \
    - "$image"
