#!/usr/bin/env bash
# Start the SuperLink on this (server) machine: TLS and SuperNode authentication by default,
# plain text only with --insecure. One port serves SuperNodes and the flwr CLI.
#   bash scripts/deploy/superlink.sh [--keys DIR] [--host 0.0.0.0] [--port 8000] [--state FILE] [--insecure]
set -euo pipefail
source "$(dirname "$0")/common.sh"
host=0.0.0.0 port=8000 state=$root/deploy-state/superlink.db
while [ $# -gt 0 ]; do
  case $1 in
    --keys) keys=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    --insecure) insecure=1; shift ;;
    *) echo "superlink.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
whole --port "$port"
mkdir -p "$(dirname "$state")"
args=(--host "$host" --port "$port" --database "$state" --disable-runtime-dependency-installation)
if [ "$insecure" = 1 ]; then
  echo "==> SuperLink WITHOUT TLS or SuperNode authentication (--insecure): trusted networks only" >&2
  args+=(--insecure)
else
  need "$keys/ca.crt" "CA certificate"; need "$keys/server.pem" "server certificate"
  need "$keys/server.key" "server key"
  args+=(--ssl-ca-certfile "$keys/ca.crt" --ssl-certfile "$keys/server.pem"
         --ssl-keyfile "$keys/server.key" --enable-supernode-auth)
fi
exec flower-superlink "${args[@]}"
