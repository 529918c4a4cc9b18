#!/usr/bin/env bash
# Makes a throwaway certificate authority and two certificates signed by it,
# for trying TLS on loopback (the backends' TLS tests use it):
#
#   scripts/test-certs.sh DIR
#
# writes into DIR:
#   ca.pem, ca-key.pem          the CA (CN "dprim test CA")
#   server.pem, server-key.pem  for the server (CN 127.0.0.1)
#   client.pem, client-key.pem  for a client's own identity (CN dprim-client)
# Both certificates name IP 127.0.0.1 and DNS localhost and may serve as
# server or client certificates; they are valid for 2 days. Keys are
# unencrypted PKCS#8. Never use them outside tests. Installs openssl with
# apt-get if it is missing.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: scripts/test-certs.sh DIR" >&2
    exit 2
fi
if ! command -v openssl >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q openssl >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q openssl >/dev/null 2>&1; } ||
        { echo "error: openssl not found and could not be installed; install it (apt-get install openssl)" >&2; exit 1; }
fi
mkdir -p "$1"
cd "$1"

quiet() { # runs openssl, showing its output only if it fails
    local out
    if ! out=$(openssl "$@" 2>&1); then
        printf 'error: openssl %s failed:\n%s\n' "$1" "$out" >&2
        exit 1
    fi
}

quiet req -x509 -newkey rsa:2048 -nodes -days 2 \
    -keyout ca-key.pem -out ca.pem -subj "/CN=dprim test CA"
for pair in server:127.0.0.1 client:dprim-client; do
    name=${pair%%:*} cn=${pair#*:}
    quiet req -newkey rsa:2048 -nodes -keyout "$name-key.pem" -out "$name.csr" -subj "/CN=$cn"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$name.ext"
    quiet x509 -req -in "$name.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -days 2 -out "$name.pem" -extfile "$name.ext"
    rm -f "$name.csr" "$name.ext"
done
