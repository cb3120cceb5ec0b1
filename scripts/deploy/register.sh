#!/usr/bin/env bash
# Register a SuperNode's public key with the SuperLink (needed before it may connect when
# SuperNode authentication is on). Run where the flwr CLI has the connection (connect.sh).
# With --partition K --bindings FILE it also binds partition K to the node id the SuperLink gave
# this key, in FILE (JSON, created or updated): give FILE to the run as partition-bindings and a
# claim of partition K by any other node is refused, whoever speaks first.
#   bash scripts/deploy/register.sh deploy-keys/supernode-0.pub [--name fedqssl] \
#       [--partition 0 --bindings deploy-keys/partition-bindings.json]
set -euo pipefail
source "$(dirname "$0")/common.sh"
public_key=${1:?usage: register.sh KEY.pub [--name CONNECTION] [--partition K --bindings FILE]}
shift
name=fedqssl
partition=
bindings=
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --bindings) bindings=$2; shift 2 ;;
    *) echo "register.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export FLWR_HOME=${FLWR_HOME:-$root/.flwr}
need "$public_key" "SuperNode public key"
if [ -z "$partition$bindings" ]; then
  exec flwr supernode register "$public_key" "$name"
fi
[ -n "$partition" ] && [ -n "$bindings" ] || { echo "register.sh: give --partition and --bindings together" >&2; exit 2; }
whole "--partition" "$partition"
reply=$(flwr supernode register "$public_key" "$name" --format json)
"$bin/python" - "$bindings" "$partition" "$reply" <<'PY'
"""Bind the partition to the node id in flwr's JSON reply; write the file whole (temp, rename)."""
import json, os, sys, tempfile
path, partition, reply = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    node = str(int(json.loads(reply[reply.index("{"):])["node-id"]))
except (ValueError, KeyError, TypeError):
    sys.exit(f"register.sh: flwr gave no node id: {reply.strip()[-300:]}")
bindings = {}
if os.path.exists(path):
    try:
        bindings = json.load(open(path))
    except ValueError as error:
        sys.exit(f"register.sh: {path} is not a bindings file ({error}): fix or remove it")
other = next((k for k, v in bindings.items() if str(v) == node and k != partition), None)
if other is not None:
    sys.exit(f"register.sh: node {node} is already bound to partition {other} in {path}")
bindings[partition] = node
handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".json")
with os.fdopen(handle, "w") as file:
    json.dump(dict(sorted(bindings.items(), key=lambda kv: int(kv[0]))), file, indent=1)
os.replace(temporary, path)
print(f"partition {partition} -> node {node} in {path}")
PY
