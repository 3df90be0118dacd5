#!/usr/bin/env bash
# Make a throwaway certificate authority and a server certificate signed by it, for a first try of
# HTTPS. For production use a certificate from your CA (or terminate TLS at a load balancer).
#   scripts/make_cert.sh OUT_DIR [NAME_OR_IP ...]     (default names: localhost 127.0.0.1)
# Writes OUT_DIR/ca.pem (give it to clients: --cacert), OUT_DIR/server.pem and OUT_DIR/server.key
# (private, mode 600; for config.properties certificate_file and private_key_file).
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
for a in "$@"; do
  [[ "$a" != -* ]] || { echo "make_cert: error: unknown option $a (usage: scripts/make_cert.sh OUT_DIR [NAME_OR_IP ...])" >&2; exit 2; }
done
out="${1:?usage: scripts/make_cert.sh OUT_DIR [NAME_OR_IP ...]}"
shift
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(localhost 127.0.0.1)
command -v openssl >/dev/null || { echo "make_cert: error: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
umask 077
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
san=""
for n in "${names[@]}"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san="${san%,}"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=melanoma throwaway CA" \
  -keyout "$tmp/ca.key" -out "$tmp/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
# PKCS#8 key: the form TorchServe's Netty TLS expects.
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp/server.key" 2>/dev/null
openssl req -new -key "$tmp/server.key" -subj "/CN=${names[0]}" -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' "$san" > "$tmp/ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days 30 -extfile "$tmp/ext" -out "$tmp/server.pem" 2>/dev/null
install -m 644 "$tmp/ca.pem" "$out/ca.pem"
install -m 644 "$tmp/server.pem" "$out/server.pem"
install -m 600 "$tmp/server.key" "$out/server.key"
echo "make_cert: wrote $out/ca.pem, $out/server.pem, $out/server.key for: ${names[*]} (valid 30 days)"
