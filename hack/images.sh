#!/usr/bin/env bash
# Build the llamaherd container images on a machine without a container registry.
#
#   hack/images.sh            start dockerd if needed, make the base image, build both CPU images
#   hack/images.sh base       only the base image (llamaherd-base:bookworm, from debootstrap)
#   hack/images.sh server     base + llamaherd-server:cpu
#   hack/images.sh operator   base + llamaherd-operator:dev
#   hack/images.sh check-cuda parse the CUDA variant of Dockerfile.server with BuildKit
#   hack/images.sh dockerd    only make sure a Docker engine answers
#
# The base image is a Debian bookworm minbase rootfs made by debootstrap and imported with
# `docker import`; it is built once and kept (delete it with `docker rmi llamaherd-base:bookworm`).
# pip inside the build gets the host's CA bundle as a BuildKit secret (never in a layer).
# See docs/images.md.
set -Eeuo pipefail
cd "$(dirname "$0")/.."

CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}/images
BASE_IMAGE=${LLAMAHERD_BASE_IMAGE:-llamaherd-base:bookworm}
SERVER_IMAGE=${LLAMAHERD_SERVER_IMAGE:-llamaherd-server:cpu}
OPERATOR_IMAGE=${LLAMAHERD_OPERATOR_IMAGE:-llamaherd-operator:dev}
SUITE=bookworm
CA_BUNDLE=${LLAMAHERD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKERD_LOG=${LLAMAHERD_DOCKERD_LOG:-$CACHE/dockerd.log}
# Container networks stay inside 198.18.0.0/15 (docker's default 172.17.0.0/16 is not allowed).
DOCKERD_BIP=${LLAMAHERD_DOCKERD_BIP:-198.18.250.1/24}
DOCKERD_POOL=${LLAMAHERD_DOCKERD_POOL:-base=198.19.240.0/20,size=24}

STEP="start"
log() { printf '[images] %s\n' "$*"; }
step() {
    STEP=$1
    log "== $STEP"
}
fail() {
    printf '[images] FAILED in step "%s": %s\n' "$STEP" "$*" >&2
    exit 1
}
on_error() {
    printf '[images] FAILED in step "%s" (exit status %s, line %s)\n' "$STEP" "$1" "$2" >&2
}
trap 'on_error $? $LINENO' ERR

seconds_since() { echo $((SECONDS - $1)); }

need_root() {
    [ "$(id -u)" = 0 ] || fail "needs root for: $*"
}

apt_install() {
    need_root "apt-get install $*"
    log "apt-get install $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

ensure_packages() {
    step "host packages"
    local need=()
    command -v dockerd >/dev/null || need+=(docker.io)
    command -v docker >/dev/null || need+=(docker.io)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    # Only to validate compose.yaml (tests/images); the builds do not need it.
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
        || need+=(docker-compose)
    if [ ${#need[@]} -gt 0 ]; then
        apt_install $(printf '%s\n' "${need[@]}" | sort -u)
    fi
    log "docker CLI $(docker version --format '{{.Client.Version}}' 2>/dev/null || true)," \
        "dockerd $(dockerd --version | awk '{print $3}' | tr -d ,)"
}

ensure_dockerd() {
    step "dockerd"
    if docker info >/dev/null 2>&1; then
        log "a Docker engine answers ($(docker info --format '{{.ServerVersion}}'))"
        return
    fi
    need_root "starting dockerd"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    log "starting dockerd (bridge $DOCKERD_BIP, pool $DOCKERD_POOL), log in $DOCKERD_LOG"
    setsid nohup dockerd --bip="$DOCKERD_BIP" --default-address-pool "$DOCKERD_POOL" \
        >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local pid=$!
    for _ in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then
            log "dockerd ready (pid $pid)"
            return
        fi
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$DOCKERD_LOG" >&2; fail "dockerd exited, see $DOCKERD_LOG"; }
        sleep 0.5
    done
    tail -n 20 "$DOCKERD_LOG" >&2
    fail "dockerd did not answer within 60 s, see $DOCKERD_LOG"
}

# A docker command that runs BuildKit builds with --secret. Docker CLI 23+ needs the buildx
# plugin for that; older CLIs (Debian's docker.io 20.10) have BuildKit built in.
BUILD_CLI=()
find_build_cli() {
    [ ${#BUILD_CLI[@]} -gt 0 ] && return
    if docker buildx version >/dev/null 2>&1; then
        BUILD_CLI=(docker buildx build --load)
        return
    fi
    local cli major
    for cli in docker /usr/bin/docker; do
        command -v "$cli" >/dev/null || continue
        major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
        if [ -n "$major" ] && [ "$major" -lt 23 ]; then
            BUILD_CLI=(env DOCKER_BUILDKIT=1 "$cli" build)
            return
        fi
    done
    fail "no docker CLI can run a BuildKit build: install the buildx plugin (docker-buildx) or Debian's docker.io (its /usr/bin/docker 20.10 has BuildKit built in)"
}

build() {
    find_build_cli
    local secret=()
    if [ -f "$CA_BUNDLE" ]; then
        secret=(--secret "id=cacert,src=$CA_BUNDLE")
    fi
    "${BUILD_CLI[@]}" --progress=plain "${secret[@]}" "$@" 2>&1 | while IFS= read -r line; do
        printf '[images]   %s\n' "$line"
    done
    return "${PIPESTATUS[0]}"
}

debian_mirror() {
    # The first Debian archive (not -security) that apt on this host is configured with.
    local uri
    uri=$({ cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true; } \
        | sed -nE 's#^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?(https?://[^[:space:]]*/debian)/?([[:space:]].*)?$#\3#p' \
        | head -n 1)
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_base() {
    step "base image $BASE_IMAGE"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE present (cached; docker rmi it to rebuild)"
        return
    fi
    need_root "debootstrap"
    local mirror rootfs start=$SECONDS
    mirror=$(debian_mirror)
    mkdir -p "$CACHE"
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" EXIT
    log "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; fail "debootstrap failed, see $CACHE/debootstrap.log"; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb ${mirror%/debian}/debian-security $SUITE-security main
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/90llamaherd" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Retries "3";
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    chmod 755 "$rootfs"
    log "docker import -> $BASE_IMAGE"
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "$BASE_IMAGE made in $(seconds_since "$start")s"
}

llama_cpp_python_version() {
    sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml
}

build_server() {
    step "server image $SERVER_IMAGE (CPU variant)"
    local start=$SECONDS
    build -f Dockerfile.server -t "$SERVER_IMAGE" \
        --build-arg VARIANT=cpu \
        --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg LLAMA_CPP_PYTHON_VERSION="$(llama_cpp_python_version)" \
        --build-arg BUILD_JOBS="$(nproc)" \
        . || fail "docker build of $SERVER_IMAGE failed (output above)"
    log "$SERVER_IMAGE built in $(seconds_since "$start")s"
}

build_operator() {
    step "operator image $OPERATOR_IMAGE"
    local start=$SECONDS
    build -f Dockerfile.operator -t "$OPERATOR_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        . || fail "docker build of $OPERATOR_IMAGE failed (output above)"
    log "$OPERATOR_IMAGE built in $(seconds_since "$start")s"
}

check_cuda() {
    # BuildKit parses every stage of the Dockerfile; the builder-cuda target only sets the CUDA
    # CMake flags on top of the (cached) builder base, so this checks the CUDA variant's syntax
    # and stage graph without pulling nvidia/cuda. It builds for real where that image exists.
    step "parse the CUDA variant of Dockerfile.server"
    build -f Dockerfile.server --target builder-cuda \
        --build-arg VARIANT=cuda \
        --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        . || fail "BuildKit could not build the builder-cuda stage of Dockerfile.server"
    log "Dockerfile.server (VARIANT=cuda) parses"
}

main() {
    local what=${1:-all} start=$SECONDS
    ensure_packages
    ensure_dockerd
    case "$what" in
        dockerd) ;;
        base) ensure_base ;;
        server) ensure_base; build_server ;;
        operator) ensure_base; build_operator ;;
        check-cuda) ensure_base; check_cuda ;;
        all) ensure_base; build_server; build_operator ;;
        *) fail "unknown target '$what' (all, base, server, operator, check-cuda, dockerd)" ;;
    esac
    STEP="done"
    log "done in $(seconds_since "$start")s"
}

main "$@"
