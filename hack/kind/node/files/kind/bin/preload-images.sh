#!/bin/bash
# Import the images baked into the node image (/kind/images/*.tar: the control plane, CoreDNS,
# pause, kube-proxy) into containerd's k8s.io namespace, once per node, before the kubelet starts.
# Nothing is ever pulled: the node has no registry to pull from.
set -o errexit -o nounset -o pipefail
stamp=/var/lib/llamaherd/images-preloaded
[[ -f $stamp ]] && exit 0
for archive in /kind/images/*.tar; do
    echo "importing $archive"
    ctr --namespace=k8s.io images import --all-platforms "$archive"
done
# Label them pinned (CRI's pinned images: never garbage-collected where the runtime supports it).
ctr --namespace=k8s.io images list -q | grep -v '^sha256:' | while read -r ref; do
    ctr --namespace=k8s.io images label "$ref" io.cri-containerd.pinned=pinned >/dev/null
done
mkdir -p "$(dirname "$stamp")"
touch "$stamp"
