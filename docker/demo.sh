#!/usr/bin/env bash
# The compose demo end to end, on a machine with Docker Compose and the Debian package
# dataset-fashion-mnist (or FASHION_MNIST_DIR=/path/to/its/idx/files): keys, folders for what
# the containers write, SuperLink, registration, nodes, a 3-round run, the results.
#   bash docker/demo.sh          # then: docker compose -f docker/compose.yaml down
# tests/test_compose_demo.py runs this script unchanged against docker/compose.yaml, with each
# service as a local process in its own network and mount namespace (no Docker engine there).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME=${FLWR_HOME:-$PWD/.flwr} FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
[ -f deploy-keys/superexec.secret ] || bash scripts/deploy/make-keys.sh deploy-keys 3
# Flower's images run as uid 49999 (app): it must read the keys mounted into them and own the
# folders the SuperLink (its database) and the ServerApp (results) write to
sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
mkdir -p docker/volumes/state docker/volumes/results
$sudo_cmd chown 49999:49999 docker/volumes/state docker/volumes/results \
  deploy-keys/server.key deploy-keys/supernode-? deploy-keys/superexec.secret
compose=(docker compose -f docker/compose.yaml)
"${compose[@]}" build
"${compose[@]}" up -d superlink
bash scripts/deploy/connect.sh --name fedqssl-docker --superlink 127.0.0.1:8000 --keys deploy-keys
# the SuperLink takes a few seconds to serve: retry the first registration until it answers
for attempt in $(seq 30); do
  bash scripts/deploy/register.sh deploy-keys/supernode-0.pub --name fedqssl-docker && break
  [ "$attempt" -eq 30 ] && { echo "demo: the SuperLink never answered on 127.0.0.1:8000" >&2; exit 1; }
  sleep 2
done
for k in 1 2; do
  bash scripts/deploy/register.sh deploy-keys/supernode-$k.pub --name fedqssl-docker
done
"${compose[@]}" up -d
.venv/bin/flwr run . fedqssl-docker --run-config docker/demo.toml --stream
.venv/bin/flwr list fedqssl-docker
"${compose[@]}" exec superexec-serverapp cat /app/results/compose-demo/summary.json
