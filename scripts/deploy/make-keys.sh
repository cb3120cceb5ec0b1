#!/usr/bin/env bash
# Generate everything a TLS deployment with SuperNode authentication needs, into DIR (default
# deploy-keys/, git-ignored): a CA, the SuperLink's certificate for the given host names, and one
# ECDSA P-384 key pair (OpenSSH format) per SuperNode, and the shared secret SuperExec processes
# present to the SuperLink/SuperNodes (docker demo). Nothing here is ever committed.
#   bash scripts/deploy/make-keys.sh [DIR] [NUM_SUPERNODES] [SERVER_NAMES]
#   bash scripts/deploy/make-keys.sh deploy-keys 3 "localhost,superlink,127.0.0.1,203.0.113.7"
set -euo pipefail
dir=${1:-deploy-keys}
nodes=${2:-3}
names=${3:-localhost,superlink,127.0.0.1}
[[ $nodes =~ ^[0-9]+$ ]] || { echo "make-keys.sh: NUM_SUPERNODES must be a whole number, got '$nodes'" >&2; exit 2; }
[[ $names =~ ^[A-Za-z0-9.:,_-]+$ ]] || { echo "make-keys.sh: SERVER_NAMES must be host names or addresses separated by commas, got '$names'" >&2; exit 2; }
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "make-keys: $tool is needed (apt-get install $([ $tool = openssl ] && echo openssl || echo openssh-client))" >&2; exit 1; }
done
mkdir -p "$dir"
umask 077
san=""
IFS=',' read -ra hosts <<< "$names"
for host in "${hosts[@]}"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
openssl ecparam -genkey -name secp384r1 -noout -out "$dir/ca.key"
openssl req -x509 -new -key "$dir/ca.key" -sha384 -days 365 -subj "/CN=fedqssl deployment CA" \
  -out "$dir/ca.crt" 2>/dev/null
openssl ecparam -genkey -name secp384r1 -noout -out "$dir/server.key"
openssl req -new -key "$dir/server.key" -subj "/CN=${hosts[0]}" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "${san%,}" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 365 -sha384 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
for ((k = 0; k < nodes; k++)); do
  rm -f "$dir/supernode-$k" "$dir/supernode-$k.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedqssl-supernode-$k" -f "$dir/supernode-$k"
done
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/superexec.secret"  # SuperExec <-> links
chmod 644 "$dir/ca.crt" "$dir/server.pem" "$dir"/supernode-*.pub
echo "==> $dir: ca.crt (give to every SuperNode and the flwr CLI), server.pem + server.key (SuperLink"
echo "    only), supernode-K + supernode-K.pub for K in 0..$((nodes - 1)) (private key stays on node K),"
echo "    superexec.secret (SuperLink, SuperNodes and their SuperExecs; docker demo)"
