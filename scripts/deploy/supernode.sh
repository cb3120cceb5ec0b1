#!/usr/bin/env bash
# Start one SuperNode (a device): its id, its bitwidth and its data are its own node config, so
# the server needs no list of clients. --local-data DIR: the device's own data, used whole
# (class folders 0/, 1/, ... of images, a flat folder, an .npz or an idx pair); without it the
# device cuts partition K of the run's dataset (found in --data-dir, else its usual place).
#   bash scripts/deploy/supernode.sh --partition-id 0 --num-partitions 3 --bitwidth 4 \
#       [--local-data DIR | --data-dir DIR] [--superlink HOST:8000] [--keys DIR] [--key FILE]
#       [--port 9094] [--max-retries N] [--insecure]
set -euo pipefail
source "$(dirname "$0")/common.sh"
superlink=127.0.0.1:8000 partition="" partitions="" bits="" data_dir="" local_data="" key="" port="" retries=""
while [ $# -gt 0 ]; do
  case $1 in
    --partition-id) partition=$2; shift 2 ;;
    --num-partitions) partitions=$2; shift 2 ;;
    --bitwidth) bits=$2; shift 2 ;;
    --superlink) superlink=$2; shift 2 ;;
    --data-dir) data_dir=$2; shift 2 ;;
    --local-data) local_data=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --key) key=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --max-retries) retries=$2; shift 2 ;;
    --insecure) insecure=1; shift ;;
    *) echo "supernode.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for name in partition partitions bits; do
  [ -n "${!name}" ] || { echo "supernode.sh: --partition-id, --num-partitions and --bitwidth are required" >&2; exit 2; }
done
whole --partition-id "$partition"; whole --num-partitions "$partitions"; whole --bitwidth "$bits"
[ -z "$port" ] || whole --port "$port"
[ -z "$retries" ] || whole --max-retries "$retries"
[ -z "$data_dir" ] || plain_path --data-dir "$data_dir"
[ -z "$local_data" ] || plain_path --local-data "$local_data"
node_config="partition-id=$partition num-partitions=$partitions bitwidth=$bits"
[ -n "$data_dir" ] && node_config+=" data-dir=\"$(cd "$data_dir" && pwd)\""
if [ -n "$local_data" ]; then
  [ -e "$local_data" ] || { echo "supernode.sh: --local-data $local_data does not exist" >&2; exit 2; }
  node_config+=" local-data=\"$(realpath "$local_data")\""
fi
args=(--superlink "$superlink" --node-config "$node_config" --port "${port:-$((9094 + partition))}")
[ -n "$retries" ] && args+=(--max-retries "$retries")
if [ "$insecure" = 1 ]; then
  args+=(--insecure)
else
  key=${key:-$keys/supernode-$partition}
  need "$keys/ca.crt" "CA certificate"; need "$key" "SuperNode private key"
  args+=(--root-certificates "$keys/ca.crt" --auth-supernode-private-key "$key")
fi
# each node its own Flower home (the apps it installs), also when several share one machine
export FLWR_HOME=${FLWR_HOME:-$root/.flwr/supernode-$partition}
mkdir -p "$FLWR_HOME"
echo "supernode.sh: partition $partition at $bits bits, Flower home $FLWR_HOME (runs until stopped: Ctrl-C)" >&2
exec flower-supernode "${args[@]}"
