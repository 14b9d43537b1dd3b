#!/usr/bin/env bash
# Throwaway certificates for trying `shimmy-extproc` over mutual TLS behind your own Envoy (docs/standalone.md).
#
#   scripts/make-dev-certs.sh [DIR]     # DIR defaults to ./dev-certs; existing files there are replaced
#
# Makes, with the openssl CLI (P-256 keys, valid 7 days, unencrypted: for a laptop, never for production):
#   ca.crt, ca.key                    a private CA that signs both sides
#   server.crt, server.key            the processor's certificate: DNS shimmy-extproc.example.internal and
#                                     localhost, IP 127.0.0.1 (envoy/standalone.example.yaml's `sni` and SAN match)
#   envoy-client.crt, envoy-client.key  Envoy's client certificate, which the processor's EXTPROC_TLS_CLIENT_CA
#                                     (ca.crt) trusts
# and checks each leaf against the CA with `openssl verify` before it says done.
set -euo pipefail

dir=${1:-dev-certs}
days=7
server_name=shimmy-extproc.example.internal

command -v openssl >/dev/null || { echo "make-dev-certs: the openssl CLI is not installed" >&2; exit 1; }
mkdir -p "$dir"
cd "$dir"
umask 077  # the keys are readable by you only

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -keyout ca.key -out ca.crt -subj "/CN=shimmy-gateway dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# leaf NAME SUBJECT_ALT_NAMES EXTENDED_KEY_USAGE: a key, a request, and a certificate signed by ca.key.
leaf() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=critical,CA:FALSE\n' "$2" "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

leaf server "DNS:$server_name,DNS:localhost,IP:127.0.0.1" serverAuth
leaf envoy-client "DNS:envoy" clientAuth
rm -f ca.srl
chmod 0644 ./*.crt

openssl verify -CAfile ca.crt -purpose sslserver server.crt >/dev/null
openssl verify -CAfile ca.crt -purpose sslclient envoy-client.crt >/dev/null
echo "make-dev-certs: ca.crt, server.crt/.key, envoy-client.crt/.key in $PWD (valid $days days)"
