#!/usr/bin/env bash
# Make a local Debian base image where no container registry is reachable:
# debootstrap a minimal Debian (the host's release by default) and import it with podman/docker.
#
#   sudo docker/make-base.sh                 # -> localhost/atoll-base:bookworm
#   SUITE=bookworm MIRROR=http://deb.debian.org/debian sudo docker/make-base.sh
#
# Only a Debian mirror is needed (plain HTTP; apt checks the signatures). The image is the
# CPU test base for both Dockerfiles (--build-arg BASE_IMAGE=localhost/atoll-base:bookworm);
# hospitals keep the CUDA base. Needs root (debootstrap) and debootstrap itself
# (apt-get install debootstrap). The root filesystem is built under $ATOLL_CONTAINER_WORK
# (default /var/tmp/atoll-containers), never inside the repository.
set -euo pipefail

SUITE=${SUITE:-$( . /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
WORK=${ATOLL_CONTAINER_WORK:-/var/tmp/atoll-containers}
TAG=${BASE_IMAGE:-localhost/atoll-base:${SUITE}}
ENGINE=${ATOLL_CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}

die() { echo "make-base.sh: $*" >&2; exit 1; }
[ -n "$ENGINE" ] || die "neither podman nor docker is installed (apt-get install podman runc)"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
[ "$(id -u)" = 0 ] || die "debootstrap needs root: run it with sudo"

if [ "${1:-}" != "--force" ] && "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
    echo "make-base.sh: $TAG exists already (--force rebuilds it)"
    exit 0
fi

ROOTFS="$WORK/rootfs-$SUITE"
rm -rf "$ROOTFS"
mkdir -p "$WORK"
start=$(date +%s)
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR"
# The builds install python3 with apt: the release, its updates and the security archive.
security=${MIRROR%/debian}/debian-security
cat > "$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $security $SUITE-security main
SOURCES
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
tar --numeric-owner -C "$ROOTFS" -c . \
    | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
rm -rf "$ROOTFS"
echo "make-base.sh: $TAG from debootstrap $SUITE in $(( $(date +%s) - start )) s"
