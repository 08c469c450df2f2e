#!/usr/bin/env bash
# The local kind cluster "llamaherd" on the node image that node-image.sh builds.
#
#   hack/kind/cluster.sh up     create it (or reuse a running one), build and load the images;
#                               the last line printed is the kubeconfig path
#   hack/kind/cluster.sh down   delete it and its docker network; nothing is left behind
#
# Addresses stay in 198.18.0.0/15 (the range set aside for benchmarks): the docker network
# 198.18.252.0/24, pods 198.18.0.0/17 (the node's static bridge uses 198.18.0.0/24), Services
# 198.19.0.0/20; IPv4 only. Nothing is pulled: every image the cluster runs is built here and
# either baked into the node image or loaded with `kind load docker-image`.
# On hosts whose capability bounding set lacks CAP_SYS_RESOURCE the cluster config also sets
# containerd's restrict_oom_score_adj (see hack/kind/runc-wrapper/main.go and docs/e2e.md).
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=../versions.env
source hack/versions.env

CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
CLUSTER=${LLAMAHERD_KIND_CLUSTER:-llamaherd}
NETWORK=${LLAMAHERD_KIND_NETWORK:-llamaherd-kind}
NETWORK_SUBNET=${LLAMAHERD_KIND_SUBNET:-198.18.252.0/24}
POD_SUBNET=198.18.0.0/17
SERVICE_SUBNET=198.19.0.0/20
STATE=$CACHE/kind
KUBECONFIG_PATH=$STATE/$CLUSTER.kubeconfig
KIND=$CACHE/bin/kind-$KIND_VERSION/kind
KUBECTL=$CACHE/bin/kubernetes-$KUBERNETES_VERSION/kubectl
# Every image the e2e tests and the demo run, built by hack/images.sh.
IMAGES=(llamaherd-server:cpu llamaherd-operator:dev llamaherd-prometheus:bookworm llamaherd-e2e-client:dev)
STEP=start

log() { printf '[kind] %s\n' "$*" >&2; }
step() {
    STEP=$1
    log "== $STEP"
}
trap 'rc=$?; [ $rc -eq 0 ] || printf "[kind] FAILED in step \"%s\" (exit %s)\n" "$STEP" "$rc" >&2' EXIT

lacks_sys_resource() {
    local bounding
    bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
    (( (16#$bounding & (1 << 24)) == 0 ))
}

node_running() {
    [ "$(docker inspect -f '{{.State.Running}}' "$CLUSTER-control-plane" 2>/dev/null)" = true ]
}

# api_ready SECONDS: the API server answers /readyz within that time.
api_ready() {
    local deadline=$((SECONDS + $1))
    while ((SECONDS < deadline)); do
        "$KUBECTL" --kubeconfig "$KUBECONFIG_PATH" get --raw /readyz >/dev/null 2>&1 && return 0
        sleep 2
    done
    return 1
}

write_config() {
    local node_image=$1 config=$STATE/$CLUSTER.yaml
    mkdir -p "$STATE"
    {
        cat <<YAML
# Written by hack/kind/cluster.sh.
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: $CLUSTER
networking:
  ipFamily: ipv4
  podSubnet: $POD_SUBNET
  serviceSubnet: $SERVICE_SUBNET
  # One node: the node image carries a static bridge CNI config (hack/kind/node/files).
  disableDefaultCNI: true
  kubeProxyMode: iptables
nodes:
  - role: control-plane
    image: $node_image
kubeadmConfigPatches:
  - |
    kind: KubeletConfiguration
    # Written by the node's entrypoint: the node's resolv.conf without Docker's loopback DNS.
    resolvConf: /etc/llamaherd/pod-resolv.conf
YAML
        if lacks_sys_resource; then
            cat <<'YAML'
# This host cannot grant CAP_SYS_RESOURCE, so no process here may lower an oom_score_adj: let
# containerd clamp the kubelet's requested scores instead of failing the container.
containerdConfigPatches:
  - |-
    [plugins."io.containerd.grpc.v1.cri"]
      restrict_oom_score_adj = true
YAML
        fi
    } >"$config"
    echo "$config"
}

up() {
    step "node image"
    local node_image
    node_image=$(bash hack/kind/node-image.sh | tail -n 1)
    step "project images"
    bash hack/images.sh all >&2
    bash hack/images.sh prometheus >&2
    bash hack/images.sh e2e-client >&2
    step "cluster $CLUSTER"
    if node_running; then
        local running
        running=$(docker inspect -f '{{.Config.Image}}' "$CLUSTER-control-plane")
        if [ "$running" != "$node_image" ]; then
            log "cluster $CLUSTER runs $running, not $node_image: recreating it"
            down_cluster
        fi
    fi
    if node_running; then
        "$KIND" export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG_PATH" >&2
        if api_ready 60; then
            log "cluster $CLUSTER is running (reused)"
        else
            log "cluster $CLUSTER runs but its API server does not answer: recreating it"
            down_cluster
        fi
    fi
    if ! node_running; then
        "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
        if ! docker network inspect "$NETWORK" >/dev/null 2>&1; then
            log "docker network $NETWORK ($NETWORK_SUBNET, IPv4 only)"
            docker network create --driver bridge --subnet "$NETWORK_SUBNET" \
                -o com.docker.network.bridge.enable_ip_masquerade=true "$NETWORK" >/dev/null
        fi
        local config start=$SECONDS
        config=$(write_config "$node_image")
        log "kind create cluster (config $config)"
        KIND_EXPERIMENTAL_DOCKER_NETWORK=$NETWORK "$KIND" create cluster --name "$CLUSTER" \
            --config "$config" --kubeconfig "$KUBECONFIG_PATH" --wait 5m >&2
        log "cluster $CLUSTER up in $((SECONDS - start))s"
    fi
    step "load images"
    "$KIND" load docker-image --name "$CLUSTER" "${IMAGES[@]}" >&2
    STEP=done
    echo "$KUBECONFIG_PATH"
}

down_cluster() {
    "$KIND" delete cluster --name "$CLUSTER" >&2
    rm -f "$KUBECONFIG_PATH"
}

down() {
    step "delete cluster $CLUSTER"
    if [ -x "$KIND" ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        down_cluster
        if docker network inspect "$NETWORK" >/dev/null 2>&1; then
            docker network rm "$NETWORK" >/dev/null
            log "docker network $NETWORK removed"
        fi
    else
        log "no kind or no Docker engine: nothing to delete"
    fi
    STEP=done
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
