#!/usr/bin/env bash
# Register a SuperNode's public key with the SuperLink (needed before it may connect when
# SuperNode authentication is on). Run where the flwr CLI has the connection (connect.sh).
#   bash scripts/deploy/register.sh deploy-keys/supernode-0.pub [--name fedqssl]
set -euo pipefail
source "$(dirname "$0")/common.sh"
public_key=${1:?usage: register.sh KEY.pub [--name CONNECTION]}
shift
name=fedqssl
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    *) echo "register.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export FLWR_HOME=${FLWR_HOME:-$root/.flwr}
need "$public_key" "SuperNode public key"
exec flwr supernode register "$public_key" "$name"
