#!/usr/bin/env bash
# A development CA and one certificate signed by it, for TLS and mutual TLS between
# lazyserve processes (and etcd) on one machine or in the compose stack. Not for production:
# the CA key sits beside the certificates. Kubernetes users get theirs from cert-manager or
# their own CA (k8s/README.md).
#
#   scripts/dev-certs.sh DIR [NAME...]
#
# Writes, in the layout of a Kubernetes TLS Secret made by cert-manager:
#   DIR/ca.crt             the CA certificate: --tls-ca of every process
#   DIR/ca.key             the CA key (keep it, or delete it once the certificates are made)
#   DIR/tls.crt, tls.key   a certificate for servers and clients alike (serverAuth and
#                          clientAuth): --tls-cert/--tls-key, and the client pair by default
# The certificate names localhost, 127.0.0.1, ::1 and every NAME (a DNS name or an IP
# address): the host names other processes dial, e.g. router prefill decode for compose.
# An existing DIR/ca.crt and ca.key are reused, so a second run issues a new certificate from
# the same CA (a rotation).
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
command -v openssl >/dev/null || { echo "dev-certs.sh needs openssl (apt-get install openssl)" >&2; exit 1; }

dir=$1
shift
mkdir -p "$dir"
cd "$dir"

if [ ! -f ca.crt ] || [ ! -f ca.key ]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 -days 3650 \
    -keyout ca.key -out ca.crt -subj "/CN=lazyserve development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then
    sans="$sans,IP:$name"
  else
    sans="$sans,DNS:$name"
  fi
done

ext=$(mktemp)
csr=$(mktemp)
trap 'rm -f "$ext" "$csr"' EXIT
printf '%s\n' "subjectAltName=$sans" "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" >"$ext"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout tls.key.new -out "$csr" \
  -subj "/CN=lazyserve" 2>/dev/null
openssl x509 -req -in "$csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" -sha256 \
  -days 825 -extfile "$ext" -out tls.crt.new 2>/dev/null
chmod 600 ca.key tls.key.new
# The key first, then the certificate, each by rename: a process that reloads on change
# never reads a half-written file.
mv tls.key.new tls.key
mv tls.crt.new tls.crt
echo "wrote $(pwd)/{ca.crt,tls.crt,tls.key}; the certificate names $sans"
