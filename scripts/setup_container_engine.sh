#!/usr/bin/env bash
# Installs the container engine that the agent's docker-runtime tests, `make demo-container` and
# `make bench` use (training_infra/local/containers.py): Debian's podman, runc, catatonit (podman's
# --init), busybox-static (the image's only content), docker-registry (the local ECR) and
# apache2-utils (htpasswd for its login). Idempotent: nothing happens when all are there.
# Not root: one line, exit 0; the container tests then skip, except with CI=true, where they fail.
set -euo pipefail

PACKAGES=(podman runc catatonit busybox-static docker-registry apache2-utils)
TOOLS=(podman runc catatonit busybox docker-registry htpasswd unshare)

missing=()
for tool in "${TOOLS[@]}"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
((${#missing[@]} > 0)) || exit 0
if ((EUID != 0)); then
  echo "container engine: ${missing[*]} not installed and not root: the docker-runtime tests will be skipped"
  exit 0
fi
echo "==> container engine: apt-get install ${PACKAGES[*]} (about 30 s)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
for tool in "${TOOLS[@]}"; do
  command -v "$tool" >/dev/null || { echo "container engine: $tool still missing after apt-get install" >&2; exit 1; }
done
