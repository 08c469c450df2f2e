#!/usr/bin/env bash
# Build the llamaherd container images on a machine without a container registry.
#
#   hack/images.sh            start dockerd if needed, make the base image, build both CPU images
#   hack/images.sh base       only the base image (llamaherd-base:bookworm, from debootstrap)
#   hack/images.sh server     base + llamaherd-server:cpu
#   hack/images.sh server-cuda base + llamaherd-server:cuda (CUDA 13 from PyPI; a cold build
#                             compiles llama.cpp's CUDA kernels: about an hour and a half on 2
#                             cores; LLAMAHERD_CUDA_ARCHITECTURES narrows the GPU list)
#   hack/images.sh operator   base + llamaherd-operator:dev
#   hack/images.sh prometheus base + llamaherd-prometheus:bookworm (the chart's in-cluster Prometheus)
#   hack/images.sh e2e-client base + llamaherd-e2e-client:dev (e2e/Dockerfile.client: openai, load)
#   hack/images.sh check-cuda build only the CUDA toolchain stage of Dockerfile.server
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
SERVER_CUDA_IMAGE=${LLAMAHERD_SERVER_CUDA_IMAGE:-llamaherd-server:cuda}
# Empty: the Dockerfile's default list (Ampere, Ada, Hopper).
CUDA_ARCHITECTURES=${LLAMAHERD_CUDA_ARCHITECTURES:-}
OPERATOR_IMAGE=${LLAMAHERD_OPERATOR_IMAGE:-llamaherd-operator:dev}
PROMETHEUS_IMAGE=${LLAMAHERD_PROMETHEUS_IMAGE:-llamaherd-prometheus:bookworm}
E2E_CLIENT_IMAGE=${LLAMAHERD_E2E_CLIENT_IMAGE:-llamaherd-e2e-client:dev}
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

# True when this host's capability bounding set lacks CAP_SYS_RESOURCE (bit 24): then
# `docker run --privileged`, and so every kind node, fails unless dockerd runs containers through
# hack/kind/runc-wrapper (see its main.go and docs/e2e.md).
lacks_sys_resource() {
    local bounding
    bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
    (( (16#$bounding & (1 << 24)) == 0 ))
}

# Build the runc wrapper into the cache, keyed by its source; prints its path.
runc_wrapper() {
    local src=hack/kind/runc-wrapper key dest
    key=$(cat "$src/go.mod" "$src/main.go" | sha256sum | cut -c1-12)
    dest=$CACHE/../bin/llamaherd-runc-$key/llamaherd-runc
    if [ ! -x "$dest" ]; then
        log "building the runc wrapper ($src) into $(dirname "$dest")" >&2
        mkdir -p "$(dirname "$dest")"
        (cd "$src" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local \
            go build -trimpath -o "$dest.tmp" .) >&2
        mv "$dest.tmp" "$dest"
    fi
    realpath "$dest"
}

DOCKERD_RUNTIME=llamaherd-runc
ensure_dockerd() {
    step "dockerd"
    local runtime_args=()
    if lacks_sys_resource; then
        runtime_args=(--add-runtime "$DOCKERD_RUNTIME=$(runc_wrapper)" --default-runtime "$DOCKERD_RUNTIME")
    fi
    if docker info >/dev/null 2>&1; then
        local default
        default=$(docker info --format '{{.DefaultRuntime}}')
        log "a Docker engine answers ($(docker info --format '{{.ServerVersion}}'), runtime $default)"
        if [ ${#runtime_args[@]} -gt 0 ] && [ "$default" != "$DOCKERD_RUNTIME" ]; then
            local pid
            pid=$(pgrep -x dockerd | head -n 1 || true)
            [ -n "$pid" ] && grep -q -- "--bip=$DOCKERD_BIP" "/proc/$pid/cmdline" 2>/dev/null \
                || fail "this host lacks CAP_SYS_RESOURCE, so kind needs dockerd to run with --add-runtime $DOCKERD_RUNTIME=$(runc_wrapper) --default-runtime $DOCKERD_RUNTIME; restart your dockerd that way (see docs/e2e.md)"
            log "restarting the dockerd this script started (pid $pid) with the runc wrapper"
            kill "$pid"
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        else
            return 0
        fi
    fi
    need_root "starting dockerd"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    log "starting dockerd (bridge $DOCKERD_BIP, pool $DOCKERD_POOL${runtime_args:+, runtime $DOCKERD_RUNTIME}), log in $DOCKERD_LOG"
    setsid nohup dockerd --bip="$DOCKERD_BIP" --default-address-pool "$DOCKERD_POOL" \
        "${runtime_args[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null &
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

# A BuildKit build (hack/docker-build.sh picks the CLI that can run one).
build() {
    local secret=()
    if [ -f "$CA_BUNDLE" ]; then
        secret=(--secret "id=cacert,src=$CA_BUNDLE")
    fi
    bash hack/docker-build.sh --progress=plain "${secret[@]}" "$@" 2>&1 | while IFS= read -r line; do
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

# The llama-cpp-python wheel compiled once for the host's .venv and this image (hack/llama-wheel.sh
# builds it if setup has not), handed to Dockerfile.server through hack/image-wheels/.
stage_llama_wheel() {
    local dir host
    rm -f hack/image-wheels/*.whl
    # The wheel links against this host's glibc and libstdc++: only the same Debian release as
    # the image's base may hand it over.
    host=$(. /etc/os-release 2>/dev/null && echo "${ID:-}-${VERSION_CODENAME:-}")
    if [ "$host" != "debian-$SUITE" ]; then
        log "host is ${host:-unknown}, the image's base debian-$SUITE: the image compiles its own llama-cpp-python"
        return
    fi
    dir=$(env -u CMAKE_ARGS bash hack/llama-wheel.sh | tail -n 1) \
        || fail "could not build the llama-cpp-python wheel (output above)"
    cp "$dir"/llama_cpp_python-*.whl hack/image-wheels/
    log "llama-cpp-python wheel from $dir (not compiled again in the image)"
}

build_server() {
    step "server image $SERVER_IMAGE (CPU variant)"
    local start=$SECONDS
    stage_llama_wheel
    local status=0
    build -f Dockerfile.server -t "$SERVER_IMAGE" \
        --build-arg VARIANT=cpu \
        --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg LLAMA_CPP_PYTHON_VERSION="$(llama_cpp_python_version)" \
        --build-arg BUILD_JOBS="$(nproc)" \
        . || status=$?
    # Staged for this build only: the builder stage copies the folder, so a wheel left there
    # would change the CUDA variant's cache key and recompile its kernels.
    rm -f hack/image-wheels/*.whl
    [ "$status" = 0 ] || fail "docker build of $SERVER_IMAGE failed (output above)"
    log "$SERVER_IMAGE built in $(seconds_since "$start")s"
}

build_server_cuda() {
    step "server image $SERVER_CUDA_IMAGE (CUDA variant)"
    local start=$SECONDS archs=()
    [ -n "$CUDA_ARCHITECTURES" ] && archs=(--build-arg "CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES")
    log "a cold build compiles llama.cpp's CUDA kernels (about 90 minutes on 2 cores for the" \
        "default architectures); BuildKit's layer cache and ccache make a repeat take seconds"
    # The builder copies hack/image-wheels/: only its README, so the kernels' layer stays cached.
    rm -f hack/image-wheels/*.whl
    build -f Dockerfile.server -t "$SERVER_CUDA_IMAGE" \
        --build-arg VARIANT=cuda \
        --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg LLAMA_CPP_PYTHON_VERSION="$(llama_cpp_python_version)" \
        --build-arg BUILD_JOBS="$(nproc)" \
        "${archs[@]}" \
        . || fail "docker build of $SERVER_CUDA_IMAGE failed (output above)"
    log "$SERVER_CUDA_IMAGE built in $(seconds_since "$start")s"
}

build_operator() {
    step "operator image $OPERATOR_IMAGE"
    local start=$SECONDS
    build -f Dockerfile.operator -t "$OPERATOR_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        . || fail "docker build of $OPERATOR_IMAGE failed (output above)"
    log "$OPERATOR_IMAGE built in $(seconds_since "$start")s"
}

build_prometheus() {
    step "prometheus image $PROMETHEUS_IMAGE"
    local start=$SECONDS
    build -f monitoring/Dockerfile.prometheus -t "$PROMETHEUS_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        monitoring || fail "docker build of $PROMETHEUS_IMAGE failed (output above)"
    log "$PROMETHEUS_IMAGE built in $(seconds_since "$start")s"
}

build_e2e_client() {
    step "e2e client image $E2E_CLIENT_IMAGE"
    local start=$SECONDS
    build -f e2e/Dockerfile.client -t "$E2E_CLIENT_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        . || fail "docker build of $E2E_CLIENT_IMAGE failed (output above)"
    log "$E2E_CLIENT_IMAGE built in $(seconds_since "$start")s"
}

check_cuda() {
    # The builder-cuda stage installs CUDA 13 from PyPI (about 1 GB, cached by BuildKit) and
    # checks nvcc; it compiles no kernels, so it checks the CUDA variant's stage graph and
    # toolchain in a minute. `server-cuda` builds the whole image.
    step "the CUDA toolchain stage of Dockerfile.server"
    build -f Dockerfile.server --target builder-cuda \
        --build-arg VARIANT=cuda \
        --build-arg BUILDER_IMAGE="$BASE_IMAGE" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        . || fail "BuildKit could not build the builder-cuda stage of Dockerfile.server"
    log "Dockerfile.server (VARIANT=cuda): toolchain stage built"
}

main() {
    local what=${1:-all} start=$SECONDS
    ensure_packages
    ensure_dockerd
    case "$what" in
        dockerd) ;;
        base) ensure_base ;;
        server) ensure_base; build_server ;;
        server-cuda) ensure_base; build_server_cuda ;;
        operator) ensure_base; build_operator ;;
        prometheus) ensure_base; build_prometheus ;;
        e2e-client) ensure_base; build_e2e_client ;;
        check-cuda) ensure_base; check_cuda ;;
        all) ensure_base; build_server; build_operator ;;
        *) fail "unknown target '$what' (all, base, server, server-cuda, operator, prometheus, e2e-client, check-cuda, dockerd)" ;;
    esac
    STEP="done"
    log "done in $(seconds_since "$start")s"
}

main "$@"
