#!/bin/sh
# Make a stand-in for the official python:3.11-slim-bookworm image without Docker Hub: a Debian
# bookworm root filesystem (python3.11, venv, ca-certificates) built by mmdebstrap from this
# machine's own apt sources, imported with `docker import`. `scripts/build-image.sh` uses it when
# the default base cannot be pulled.
#
#   scripts/make-base-image.sh [TAG]        (default mbpo-base:bookworm-py3.11; needs root)
#
# Certificate authorities this machine added to Debian's local CA folder are trusted in the image
# (TLS from inside a build may pass through them); /etc/pip.conf points pip at the system store,
# since pip's own bundle would not know them. Like Debian's official images, apt keeps no
# caches or downloaded packages. Nothing else of the machine goes in.
set -eu
TAG=${1:-mbpo-base:bookworm-py3.11}

die() { echo "make-base-image: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap builds the root filesystem as root)"
command -v docker >/dev/null || die "no docker client on PATH"
if ! command -v mmdebstrap >/dev/null; then
    apt-get install -y -q mmdebstrap >/dev/null 2>&1 || {
        apt-get update -q >/dev/null && apt-get install -y -q mmdebstrap >/dev/null; } ||
        die "mmdebstrap is missing and could not be installed (apt-get install mmdebstrap)"
fi

# The machine's apt sources, as configured (deb822 .sources files or a classic sources.list).
set --
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
    [ -s "$f" ] && grep -q '^[^#]' "$f" && set -- "$@" "$f"
done
[ "$#" -gt 0 ] || die "no apt sources found in /etc/apt"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$work/pip.conf"
# as Debian's own container images: no package caches, no downloaded packages left behind
cat > "$work/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
EOF
# merged /usr by mmdebstrap's hook rather than the usrmerge package (which pulls in perl), and
# no documentation or translations, as in Debian's own slim images.
mmdebstrap --quiet --variant=minbase --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --include=python3.11,python3-venv,python-is-python3,ca-certificates \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --customize-hook='cp -a /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/"' \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook="copy-in $work/pip.conf /etc" \
    --customize-hook="copy-in $work/docker-clean /etc/apt/apt.conf.d" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$work/rootfs.tar" "$@"
docker import \
    --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --message "Debian bookworm + python3.11 by scripts/make-base-image.sh" \
    "$work/rootfs.tar" "$TAG" >/dev/null
echo "$TAG"
