#!/usr/bin/env bash
# `docker build` with BuildKit, whatever the docker CLI: Docker CLI 23+ needs the buildx plugin for
# BuildKit (and so for --secret), older CLIs (Debian's docker.io 20.10) have it built in.
#   hack/docker-build.sh [docker build arguments...]
set -euo pipefail
if docker buildx version >/dev/null 2>&1; then
    exec docker buildx build --load "$@"
fi
for cli in docker /usr/bin/docker; do
    command -v "$cli" >/dev/null || continue
    major=$("$cli" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then
        DOCKER_BUILDKIT=1 exec "$cli" build "$@"
    fi
done
echo "no docker CLI can run a BuildKit build: install the buildx plugin (docker-buildx) or Debian's docker.io (its /usr/bin/docker 20.10 has BuildKit built in)" >&2
exit 1
