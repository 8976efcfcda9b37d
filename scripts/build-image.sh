#!/bin/sh
# Build the component image (docker/Dockerfile) here or on any machine with a Docker engine.
#
#   scripts/build-image.sh IMAGE_REF [TORCH_SPEC]      (make image / make image-cuda call this)
#
# - Base: PYTHON_IMAGE (default python:3.11.7-slim-bookworm) if it is present or can be pulled;
#   otherwise scripts/make-base-image.sh makes an equivalent offline from this machine's apt
#   sources (mbpo-base:bookworm-py3.11), once, and the build uses that.
# - torch: TORCH_SPEC (default torch==2.13.0+cpu, the CPU build) is fetched into docker/wheels/
#   with this machine's own pip configuration, plus TORCH_INDEX when given, and the build
#   installs it from there; a spec pip cannot get here (the CUDA build, say) is left to the
#   build's pip and TORCH_INDEX (HOST_WHEEL=0 always leaves it to them: the CUDA build). No
#   index address is written in this repository.
# - The classic builder with host networking: BuildKit's frontend would be pulled from Docker
#   Hub, and a build container on the default network cannot reach a registry proxy on loopback.
set -eu
cd "$(dirname "$0")/.."
REF=${1:?usage: build-image.sh IMAGE_REF [TORCH_SPEC]}
TORCH_SPEC=${2:-${TORCH_SPEC:-torch==2.13.0+cpu}}
TORCH_INDEX=${TORCH_INDEX:-}
PYTHON_IMAGE=${PYTHON_IMAGE:-python:3.11.7-slim-bookworm}
OFFLINE_BASE=mbpo-base:bookworm-py3.11
PIP=${PIP:-python3.11 -m pip}

die() { echo "build-image: $*" >&2; exit 1; }
case "$TORCH_INDEX" in
    *://*@*) die "TORCH_INDEX carries credentials, which a build argument would keep in the" \
                 "image's history; put them in pip's configuration and pass the index without them" ;;
esac
docker info >/dev/null 2>&1 || die "no Docker engine answers (start dockerd, or set DOCKER_HOST)"

if docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
    base=$PYTHON_IMAGE
elif timeout 120 docker pull -q "$PYTHON_IMAGE" >/dev/null 2>&1; then
    base=$PYTHON_IMAGE
else
    echo "build-image: $PYTHON_IMAGE cannot be pulled; using $OFFLINE_BASE (scripts/make-base-image.sh)"
    docker image inspect "$OFFLINE_BASE" >/dev/null 2>&1 || scripts/make-base-image.sh "$OFFLINE_BASE"
    base=$OFFLINE_BASE
fi

# Only this spec's wheel goes into the build context; an old one would be installed instead.
find docker/wheels -name '*.whl' -delete
if [ "${HOST_WHEEL:-1}" = 1 ] && $PIP download --quiet --no-deps --only-binary=:all: \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -d docker/wheels "$TORCH_SPEC" 2>/dev/null; then
    echo "build-image: $TORCH_SPEC from this machine's pip: $(ls docker/wheels | grep whl)"
else
    echo "build-image: this machine's pip cannot get $TORCH_SPEC; the build's pip will" \
         "(set TORCH_INDEX to an index that serves it)"
fi

DOCKER_BUILDKIT=0 docker build --network=host -f docker/Dockerfile \
    --build-arg PYTHON_IMAGE="$base" --build-arg TORCH_SPEC="$TORCH_SPEC" \
    ${TORCH_INDEX:+--build-arg TORCH_INDEX="$TORCH_INDEX"} -t "$REF" .
echo "build-image: built $REF on $base ($(docker image inspect -f '{{.Size}}' "$REF" | awk '{printf "%.2f GB", $1/1e9}'))"
