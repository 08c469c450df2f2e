#!/usr/bin/env bash
# Build the llamaherd kind node image without a registry (make kind-image).
#
# `kind build node-image` downloads Kubernetes and pulls images; neither is possible here. This
# assembles the same thing from what the repository builds itself:
#   - Kubernetes v1.34.4 (kubeadm, kubelet, kubectl, the control plane, kube-proxy), etcd, crictl
#     and CoreDNS from their Go modules (hack/build-binaries.sh), and a pause binary from
#     hack/kind/node/pause.c;
#   - images for the control plane, kube-proxy, etcd, CoreDNS and pause under exactly the names
#     and tags that `kubeadm config images list` prints for the pinned version (checked here);
#   - a Debian bookworm node (the debootstrap base of hack/images.sh) with systemd, Debian's
#     containerd 1.6 and runc, the CNI plugins, and our entrypoint, units and configs
#     (hack/kind/node/files), with those images baked in for the first boot to import.
# The result is tagged llamaherd/kind-node:<k8s version>-<hash of every input>; an image with that
# tag is reused as is. The last line printed is the image name.
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../versions.env
source hack/versions.env

CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
BIN=$CACHE/bin
NODE_DIR=hack/kind/node
REGISTRY=registry.k8s.io
STEP=start
CTX=""
BASE_IMAGE=${LLAMAHERD_BASE_IMAGE:-llamaherd-base:bookworm}

log() { printf '[kind-image] %s\n' "$*" >&2; }
step() {
    STEP=$1
    log "== $STEP"
}
on_exit() {
    local rc=$?
    [ -z "$CTX" ] || rm -rf "$CTX"
    [ $rc -eq 0 ] || printf '[kind-image] FAILED in step "%s" (exit %s)\n' "$STEP" "$rc" >&2
}
trap on_exit EXIT

input_hash() {
    {
        cat hack/versions.env "$0"
        find "$NODE_DIR" -type f | LC_ALL=C sort | xargs cat
    } | sha256sum | cut -c1-12
}

step "binaries"
bash hack/build-binaries.sh kubernetes etcd crictl coredns >&2
K8S_BIN=$BIN/kubernetes-$KUBERNETES_VERSION
IMAGE=llamaherd/kind-node:$KUBERNETES_VERSION-$(input_hash)

step "dockerd and the base image"
bash hack/images.sh base >&2
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE present (cached; docker rmi it to rebuild)"
    echo "$IMAGE"
    exit 0
fi
start=$SECONDS

step "image names from kubeadm $KUBERNETES_VERSION"
mapfile -t WANTED < <("$K8S_BIN/kubeadm" config images list --kubernetes-version "$KUBERNETES_VERSION")
declare -A REF
for ref in "${WANTED[@]}"; do
    name=${ref#"$REGISTRY"/}
    name=${name%%:*}
    REF[$name]=$ref
    log "  $ref"
done
expect() {
    [ "${REF[$1]:-}" = "$2" ] || { log "kubeadm wants ${REF[$1]:-no $1 image}, this build makes $2: update hack/versions.env"; exit 1; }
}
expect coredns/coredns "$REGISTRY/coredns/coredns:$COREDNS_VERSION"
expect etcd "$REGISTRY/etcd:${ETCD_VERSION#v}-0"
pause_ref=$(sed -n 's/^ *sandbox_image = "\(.*\)"/\1/p' "$NODE_DIR/files/etc/containerd/config.toml")
expect pause "$pause_ref"

CTX=$(mktemp -d "${TMPDIR:-/tmp}/llamaherd-kind-image.XXXXXX")
mkdir -p "$CTX/node/images" "$CTX/node/bin"

# component_image REF DOCKERFILE_TEXT FILE...: build REF from a context holding the files.
component_image() {
    local ref=$1 dockerfile=$2 dir
    shift 2
    dir=$CTX/component
    rm -rf "$dir" && mkdir -p "$dir"
    cp "$@" "$dir/"
    printf '%s\n' "$dockerfile" >"$dir/Dockerfile"
    bash hack/docker-build.sh -q -t "$ref" "$dir" >/dev/null
    local out
    out=$CTX/node/images/$(basename "${ref%%:*}").tar
    docker save -o "$out" "$ref"
    log "  $ref ($(du -m "$out" | cut -f1) MiB)"
}

step "component images"
static_image() { # REF BINARY_PATH
    local bin
    bin=$(basename "$2")
    component_image "$1" "FROM scratch
COPY $bin /usr/local/bin/$bin
ENV PATH=/usr/local/bin
ENTRYPOINT [\"/usr/local/bin/$bin\"]" "$2"
}
for c in kube-apiserver kube-controller-manager kube-scheduler; do
    static_image "${REF[$c]}" "$K8S_BIN/$c"
done
static_image "${REF[etcd]}" "$BIN/etcd-$ETCD_VERSION/etcd"
component_image "${REF[coredns/coredns]}" "FROM scratch
COPY coredns /coredns
ENTRYPOINT [\"/coredns\"]" "$BIN/coredns-$COREDNS_VERSION/coredns"
gcc -static -Os -o "$CTX/pause" "$NODE_DIR/pause.c"
component_image "${REF[pause]}" "FROM scratch
COPY pause /pause
ENTRYPOINT [\"/pause\"]" "$CTX/pause"
# kube-proxy programs iptables: it needs the iptables (nft) and conntrack tools of the node's
# Debian.
component_image "${REF[kube-proxy]}" "FROM $BASE_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends iptables conntrack \\
    && rm -rf /var/lib/apt/lists/*
COPY kube-proxy /usr/local/bin/kube-proxy" "$K8S_BIN/kube-proxy"

step "node image $IMAGE"
cp -a "$NODE_DIR/files" "$NODE_DIR/Dockerfile" "$CTX/node/"
cp "$K8S_BIN/kubeadm" "$K8S_BIN/kubelet" "$K8S_BIN/kubectl" "$BIN/crictl-$CRICTL_VERSION/crictl" \
    "$CTX/node/bin/"
bash hack/docker-build.sh --progress=plain -t "$IMAGE" \
    --build-arg KUBERNETES_VERSION="$KUBERNETES_VERSION" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    "$CTX/node" 2>&1 \
    | while IFS= read -r line; do printf '[kind-image]   %s\n' "$line" >&2; done
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
STEP=done
log "$IMAGE built in $((SECONDS - start))s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MiB", $1/1048576}'))"
echo "$IMAGE"
