#!/usr/bin/env bash
# System packages the tests use for real: redis-server (standalone + cluster tests),
# prometheus (a real scrape of /metrics), chromium (the retention page rendered headless,
# tests/server/test_ui_page.py), g++ and ninja (the engine's fused kernels). Idempotent: skips
# what is already there.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v prometheus >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium chromium-driver fonts-dejavu-core)
# The engine's fused CPU kernels are a torch C++ extension: a C++ compiler and ninja build it.
command -v g++ >/dev/null || need+=(g++)
command -v ninja >/dev/null || need+=(ninja-build)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# buf (lints proto/ in tests/client/test_proto_stubs.py), installed into the repo's ignored cache.
[ -x "$(dirname "$0")/../.cache/buf/node_modules/.bin/buf" ] || npm install --no-save --prefix "$(dirname "$0")/../.cache/buf" @bufbuild/buf
# deploy/ validators (tests/deploy): docker-compose (`docker-compose config`), promtool comes with
# prometheus above. kubectl (`kubectl kustomize`) is used when present; without it the tests render
# the kustomizations with a small Python renderer (Debian's kubernetes-client is 1.20, whose built-in
# kustomize lacks components and `labels`; the official kubectl binary needs the network).
command -v docker-compose >/dev/null || {
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends docker-compose
}
