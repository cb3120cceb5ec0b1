#!/usr/bin/env bash
# The compose demo end to end, on a machine with Docker Compose and the Debian package
# dataset-fashion-mnist: keys, SuperLink, registration, nodes, a 3-round run, the results.
#   bash docker/demo.sh          # then: docker compose -f docker/compose.yaml down
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME=$PWD/.flwr FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
[ -f deploy-keys/superexec.secret ] || bash scripts/deploy/make-keys.sh deploy-keys 3
# Flower's images run as uid 49999: it must read the keys mounted into them
sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
$sudo_cmd chown 49999:49999 deploy-keys/server.key deploy-keys/supernode-? deploy-keys/superexec.secret
compose=(docker compose -f docker/compose.yaml)
"${compose[@]}" build
"${compose[@]}" up -d superlink
sleep 5
bash scripts/deploy/connect.sh --name fedqssl-docker --superlink 127.0.0.1:8000 --keys deploy-keys
for k in 0 1 2; do
  bash scripts/deploy/register.sh deploy-keys/supernode-$k.pub --name fedqssl-docker
done
"${compose[@]}" up -d
.venv/bin/flwr run . fedqssl-docker --run-config docker/demo.toml --stream
"${compose[@]}" exec superexec-serverapp cat /results/compose-demo/summary.json
