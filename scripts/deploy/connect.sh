#!/usr/bin/env bash
# Tell the flwr CLI (on the machine you run experiments from) about the SuperLink: writes the
# connection NAME into $FLWR_HOME/config.toml (default .flwr/ in this folder).
#   bash scripts/deploy/connect.sh [--name fedqssl] [--superlink HOST:8000] [--keys DIR] [--insecure]
set -euo pipefail
source "$(dirname "$0")/common.sh"
name=fedqssl superlink=127.0.0.1:8000
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --superlink) superlink=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --insecure) insecure=1; shift ;;
    *) echo "connect.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $name =~ ^[A-Za-z0-9_-]+$ ]] || { echo "connect.sh: --name must be letters, digits, '_' or '-' (a TOML key), got '$name'" >&2; exit 2; }
[[ $superlink =~ ^[][A-Za-z0-9.:_-]+$ ]] || { echo "connect.sh: --superlink must be HOST:PORT, got '$superlink'" >&2; exit 2; }
export FLWR_HOME=${FLWR_HOME:-$root/.flwr}
mkdir -p "$FLWR_HOME"
config=$FLWR_HOME/config.toml
[ -f "$config" ] || printf '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n' > "$config"
# flwr accepts only an absolute root-certificates path
python3 - "$config" "$name" "$superlink" "$insecure" "$(realpath -m "$keys/ca.crt")" <<'PY'
import re, sys
path, name, address, insecure, ca = sys.argv[1:]
text = open(path).read()
text = re.sub(rf'\n\[superlink\.{re.escape(name)}\]\n(?:[^\[].*\n?)*', "\n", text)
entry = f'\n[superlink.{name}]\naddress = "{address}"\n'
entry += "insecure = true\n" if insecure == "1" else f'root-certificates = "{ca}"\n'
open(path, "w").write(text.rstrip("\n") + "\n" + entry)
PY
[ "$insecure" = 1 ] || need "$keys/ca.crt" "CA certificate"
echo "==> connection '$name' -> $superlink in $config"
