#!/usr/bin/env bash
# Build the control-plane and tool binaries from their Go modules through the Go module proxy,
# unattended and idempotently, into
# ${LLAMAHERD_CACHE:-~/.cache/llamaherd}/bin/<component>-<version>/.
#
#   kubernetes-<v>/  kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl
#                    kubeadm kube-proxy (the last two for the kind node image)
#   etcd-<v>/        etcd
#   helm-<v>/        helm
#   kind-<v>/        kind
#   crictl-<v>/      crictl   (cri-tools; for the kind node image)
#   coredns-<v>/     coredns  (only the plugins kubeadm's Corefile uses; for the kind node image)
#
# Versions come from hack/versions.env. A component whose binaries already print the pinned
# version is skipped. Each component is built in a small wrapper module under $CACHE/src/ and
# installed with a rename, so an interrupted build never looks cached.
#
# etcd is built from go.etcd.io/etcd/server/v3 (its etcdmain package) at the version that
# kubeadm v1.34.4 deploys (v3.6.5; k8s.io/kubernetes' go.mod requires its client v3.6.4), not Debian's. Debian's
# etcd-server 3.4.23 does serve kube-apiserver 1.34 here, but the apiserver then logs
# "RequestWatchProgress feature is not supported" and gives up consistent reads from its watch
# cache: a mode that real clusters (etcd 3.5/3.6) never run; etcd 3.4 is out of upstream support.
#
# Usage: hack/build-binaries.sh [kubernetes|etcd|helm|kind ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=versions.env
source hack/versions.env

CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
BIN=$CACHE/bin
SRC=$CACHE/src
export GOPATH=$CACHE/go
export GOMODCACHE=$CACHE/go/pkg/mod
export GOCACHE=$CACHE/go/build-cache
export GOFLAGS="-mod=mod -modcacherw -buildvcs=false"
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# Only the module proxy is reachable from these machines, not the checksum database.
export GOSUMDB=${GOSUMDB:-off}

K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl kubeadm kube-proxy)
STEP=setup

log() { printf '[binaries] %s\n' "$*"; }
fail() {
    printf '[binaries] FAILED at step "%s" (exit %s); see the output above\n' "$STEP" "$1" >&2
}
trap 'rc=$?; [ $rc -eq 0 ] || fail $rc' EXIT

command -v go >/dev/null || { STEP="find go"; log "go is not on PATH"; exit 1; }
mkdir -p "$BIN" "$SRC"

# cached DIR VERSION CMD...: true when DIR/CMD[0] exists and `CMD --version`-ish prints VERSION.
cached() {
    local dir=$1 version=$2
    shift 2
    [ -x "$dir/$1" ] || return 1
    local out
    out=$("$dir/$1" "${@:2}" 2>&1) || return 1
    [[ $out == *"$version"* ]]
}

# new_module DIR NAME: start a fresh wrapper module in DIR (go.sum is kept to save lookups).
new_module() {
    mkdir -p "$1"
    printf 'module llamaherd.local/build/%s\n\ngo 1.24.0\n' "$2" >"$1/go.mod"
}

# install DIR_TMP DIR: move a finished build into place.
install_dir() {
    rm -rf "$2"
    mv "$1" "$2"
}

build_kubernetes() {
    local v=$KUBERNETES_VERSION dest=$BIN/kubernetes-$KUBERNETES_VERSION
    if cached "$dest" "$v" kube-apiserver --version \
        && cached "$dest" "$v" kubectl version --client \
        && cached "$dest" "$v" kubelet --version \
        && cached "$dest" "$v" kube-scheduler --version \
        && cached "$dest" "$v" kube-controller-manager --version \
        && cached "$dest" "$v" kubeadm version -o short \
        && cached "$dest" "$v" kube-proxy --version; then
        log "kubernetes $v: cached in $dest"
        return
    fi
    local mod=$SRC/kubernetes-$v minor=${v#v1.}
    minor=${minor%%.*}
    local staging=v0.${v#v1.}
    STEP="kubernetes $v: wrapper module"
    log "$STEP in $mod"
    new_module "$mod" kubernetes
    (cd "$mod" && go mod download -json "k8s.io/kubernetes@$v" >download.json)
    local upstream
    upstream=$(sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' "$mod/download.json")
    # k8s.io/kubernetes replaces its staging modules with ./staging paths that only work inside
    # its own repository; replace each with the published release of the same minor.
    {
        printf 'godebug default=go1.24\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
        sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\t\1 => \1 '"$staging"'#p' "$upstream"
        printf ')\n'
    } >>"$mod/go.mod"
    log "$(grep -c ' => ' "$mod/go.mod") staging modules replaced with $staging"
    STEP="kubernetes $v: go build ${K8S_BINARIES[*]}"
    log "$STEP (one invocation; a cold build takes a long while on 2 cores)"
    local date ldflags="-s -w" pkg
    date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
    done
    local pkgs=() b
    for b in "${K8S_BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
    rm -rf "$mod/out"
    mkdir -p "$mod/out"
    (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o out/ "${pkgs[@]}")
    STEP="kubernetes $v: check versions"
    [[ $("$mod/out/kube-apiserver" --version) == *"$v"* ]]
    install_dir "$mod/out" "$dest"
    log "kubernetes $v: built into $dest"
}

build_etcd() {
    local v=$ETCD_VERSION dest=$BIN/etcd-$ETCD_VERSION
    if cached "$dest" "${v#v}" etcd --version; then
        log "etcd $v: cached in $dest"
        return
    fi
    local mod=$SRC/etcd-$v
    STEP="etcd $v: wrapper module"
    log "$STEP in $mod"
    new_module "$mod" etcd
    printf '\nrequire go.etcd.io/etcd/server/v3 %s\n' "$v" >>"$mod/go.mod"
    printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n%s\n' \
        'func main() { etcdmain.Main(os.Args) }' >"$mod/main.go"
    STEP="etcd $v: go build"
    log "$STEP"
    rm -rf "$mod/out"
    mkdir -p "$mod/out"
    (cd "$mod" && go build -trimpath -ldflags "-s -w" -o out/etcd .)
    STEP="etcd $v: check version"
    [[ $("$mod/out/etcd" --version) == *"${v#v}"* ]]
    install_dir "$mod/out" "$dest"
    log "etcd $v: built into $dest"
}

build_helm() {
    local v=$HELM_VERSION dest=$BIN/helm-$HELM_VERSION
    if cached "$dest" "$v" helm version --short; then
        log "helm $v: cached in $dest"
        return
    fi
    local mod=$SRC/helm-$v
    STEP="helm $v: wrapper module"
    log "$STEP in $mod"
    new_module "$mod" helm
    printf '\nrequire helm.sh/helm/v3 %s\n' "$v" >>"$mod/go.mod"
    STEP="helm $v: go build"
    log "$STEP"
    local x=helm.sh/helm/v3/internal/version
    rm -rf "$mod/out"
    mkdir -p "$mod/out"
    (cd "$mod" && go build -trimpath \
        -ldflags "-s -w -X $x.version=$v -X $x.gitTreeState=clean" \
        -o out/helm helm.sh/helm/v3/cmd/helm)
    STEP="helm $v: check version"
    [[ $("$mod/out/helm" version --short) == *"$v"* ]]
    install_dir "$mod/out" "$dest"
    log "helm $v: built into $dest"
}

build_kind() {
    local v=$KIND_VERSION dest=$BIN/kind-$KIND_VERSION
    if cached "$dest" "$v" kind version; then
        log "kind $v: cached in $dest"
        return
    fi
    local mod=$SRC/kind-$v
    STEP="kind $v: wrapper module"
    log "$STEP in $mod"
    new_module "$mod" kind
    printf '\nrequire sigs.k8s.io/kind %s\n' "$v" >>"$mod/go.mod"
    STEP="kind $v: go build"
    log "$STEP"
    rm -rf "$mod/out"
    mkdir -p "$mod/out"
    (cd "$mod" && go build -trimpath -ldflags "-s -w" -o out/kind sigs.k8s.io/kind)
    STEP="kind $v: check version"
    [[ $("$mod/out/kind" version) == *"$v"* ]]
    install_dir "$mod/out" "$dest"
    log "kind $v: built into $dest"
}

build_crictl() {
    local v=$CRICTL_VERSION dest=$BIN/crictl-$CRICTL_VERSION
    if cached "$dest" "$v" crictl --version; then
        log "crictl $v: cached in $dest"
        return
    fi
    local mod=$SRC/crictl-$v
    STEP="crictl $v: wrapper module"
    log "$STEP in $mod"
    new_module "$mod" crictl
    printf '\nrequire sigs.k8s.io/cri-tools %s\n' "$v" >>"$mod/go.mod"
    STEP="crictl $v: go build"
    log "$STEP"
    rm -rf "$mod/out"
    mkdir -p "$mod/out"
    (cd "$mod" && go build -trimpath \
        -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$v" \
        -o out/crictl sigs.k8s.io/cri-tools/cmd/crictl)
    STEP="crictl $v: check version"
    [[ $("$mod/out/crictl" --version) == *"$v"* ]]
    install_dir "$mod/out" "$dest"
    log "crictl $v: built into $dest"
}

# CoreDNS with only the plugins of kubeadm's default Corefile (errors, health, ready, kubernetes,
# prometheus, forward, cache, loop, reload, loadbalance) plus log and hosts: CoreDNS' own main
# package links every plugin, cloud SDKs included, which triples the build on 2 cores.
build_coredns() {
    local v=$COREDNS_VERSION dest=$BIN/coredns-$COREDNS_VERSION
    if cached "$dest" "${v#v}" coredns -version; then
        log "coredns $v: cached in $dest"
        return
    fi
    local mod=$SRC/coredns-$v
    STEP="coredns $v: wrapper module"
    log "$STEP in $mod"
    new_module "$mod" coredns
    printf '\nrequire github.com/coredns/coredns %s\n' "$v" >>"$mod/go.mod"
    cat >"$mod/main.go" <<'GO'
// A CoreDNS with the plugins a kubeadm cluster's Corefile uses, in CoreDNS' plugin order.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func init() {
	dnsserver.Directives = []string{
		"reload", "ready", "health", "prometheus", "errors", "log", "loadbalance",
		"cache", "hosts", "kubernetes", "loop", "forward",
	}
}

func main() { coremain.Run() }
GO
    STEP="coredns $v: go build"
    log "$STEP"
    rm -rf "$mod/out"
    mkdir -p "$mod/out"
    (cd "$mod" && go build -trimpath -ldflags "-s -w" -o out/coredns .)
    STEP="coredns $v: check version"
    [[ $("$mod/out/coredns" -version) == *"${v#v}"* ]]
    install_dir "$mod/out" "$dest"
    log "coredns $v: built into $dest"
}

components=("$@")
[ ${#components[@]} -gt 0 ] || components=(kubernetes etcd helm kind crictl coredns)
start=$SECONDS
for c in "${components[@]}"; do
    case $c in
        kubernetes | etcd | helm | kind | crictl | coredns) "build_$c" ;;
        *) STEP="arguments"; log "unknown component: $c"; exit 2 ;;
    esac
done
STEP=done
log "all done in $((SECONDS - start))s; binaries under $BIN"
