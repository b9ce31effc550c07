#!/usr/bin/env bash
# Regenerates the keys and certificates of nbd-net's TLS unit tests with
# OpenSSL (run from this directory; the tests only read the files).
#
#   ca-cert.pem            the CA everything below is signed by
#   other-ca-cert.pem      a CA that signed nothing here
#   TYPE-cert.pem          a certificate for TYPE-*.pem: CN=localhost,
#                          subjectAltName DNS:localhost and IP:127.0.0.1,
#                          usable by a TLS server and a TLS client
#   TYPE-FLAVOUR.pem       its private key, for TYPE in rsa2048 rsa2432
#                          rsa3072 rsa4096 (pkcs1, pkcs8), p256 p384 p521
#                          (sec1, pkcs8) and ed25519 (pkcs8); p256-sec1.pem
#                          has the EC PARAMETERS block `openssl ecparam
#                          -genkey` writes before the key
#   cn-*-cert.pem,         certificates for the host name checks (key
#   san-*-cert.pem,        p256-pkcs8.pem): see the tests in ../src/tls.rs
#   no-name-cert.pem
#   rsa1024-pkcs8.pem, ed448-pkcs8.pem, encrypted-pkcs8.pem (password
#   "secret"), dsa-traditional.pem: keys that are refused
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/ext.cnf" <<'CNF'
[req]
distinguished_name = dn
[dn]
[testca]
database = $ENV::TMP/index.txt
new_certs_dir = $ENV::TMP
serial = $ENV::TMP/serial
default_md = sha256
policy = any
unique_subject = no
# Valid from 2020 to 2120, whatever the clock of the machine that runs this.
default_startdate = 20200101000000Z
default_enddate = 21200101000000Z
[any]
organizationName = optional
commonName = optional
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[cn_only]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
[san_email]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = email:nbd@example.test
[san_ip]
basicConstraints = critical, CA:FALSE
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.2
CNF

export TMP=$tmp
: >"$tmp/index.txt"
openssl rand -hex 8 >"$tmp/serial"
ca() { # NAME SUBJECT
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/$1-key.pem"
    openssl req -new -key "$tmp/$1-key.pem" -subj "$2" -config "$tmp/ext.cnf" -out "$tmp/req.pem"
    openssl ca -batch -notext -config "$tmp/ext.cnf" -name testca -selfsign -keyfile "$tmp/$1-key.pem" \
        -in "$tmp/req.pem" -extfile "$tmp/ext.cnf" -extensions ca -out "$1-cert.pem"
}
sign() { # KEY SUBJECT SECTION OUT
    openssl req -new -key "$1" -subj "$2" -config "$tmp/ext.cnf" -out "$tmp/req.pem"
    openssl ca -batch -notext -config "$tmp/ext.cnf" -name testca -preserveDN -cert ca-cert.pem \
        -keyfile "$tmp/ca-key.pem" -in "$tmp/req.pem" -extfile "$tmp/ext.cnf" -extensions "$3" -out "$4"
}

ca ca "/O=nbd-rs tests/CN=nbd-rs test CA"
ca other-ca "/O=nbd-rs tests/CN=nbd-rs other test CA"

for bits in 2048 2432 3072 4096; do
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:$bits -out rsa$bits-pkcs8.pem
    openssl pkey -in rsa$bits-pkcs8.pem -traditional -out rsa$bits-pkcs1.pem
done
for curve in 256 384 521; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-$curve -out p$curve-pkcs8.pem
    openssl ec -in p$curve-pkcs8.pem -out p$curve-sec1.pem
done
openssl ecparam -name prime256v1 -out p256-sec1.pem
openssl ec -in p256-pkcs8.pem >>p256-sec1.pem
openssl genpkey -algorithm ed25519 -out ed25519-pkcs8.pem
for type in rsa2048 rsa2432 rsa3072 rsa4096 p256 p384 p521 ed25519; do
    sign $type-pkcs8.pem "/O=nbd-rs tests/CN=localhost" leaf $type-cert.pem
done

sign p256-pkcs8.pem "/O=nbd-rs tests/CN=localhost" cn_only cn-only-cert.pem
sign p256-pkcs8.pem "/O=nbd-rs tests/CN=*.example.test" cn_only cn-wildcard-cert.pem
sign p256-pkcs8.pem "/O=nbd-rs tests/CN=127.0.0.1" cn_only cn-ip-cert.pem
sign p256-pkcs8.pem "/O=nbd-rs tests/CN=localhost/CN=other.example.test" cn_only cn-two-cert.pem
sign p256-pkcs8.pem "/O=nbd-rs tests/CN=localhost" san_email san-email-cert.pem
sign p256-pkcs8.pem "/O=nbd-rs tests/CN=localhost" san_ip san-ip-cert.pem
sign p256-pkcs8.pem "/O=nbd-rs tests" cn_only no-name-cert.pem

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024 -out rsa1024-pkcs8.pem
openssl genpkey -algorithm ed448 -out ed448-pkcs8.pem
openssl pkey -in p256-pkcs8.pem -aes256 -passout pass:secret -out encrypted-pkcs8.pem
openssl dsaparam -genkey -noout 2048 -out "$tmp/dsa.pem" 2>/dev/null ||
    openssl genpkey -genparam -algorithm DSA -pkeyopt dsa_paramgen_bits:2048 -out "$tmp/dsaparam.pem"
[[ -s $tmp/dsa.pem ]] || openssl genpkey -paramfile "$tmp/dsaparam.pem" -out "$tmp/dsa.pem"
openssl pkey -in "$tmp/dsa.pem" -traditional -out dsa-traditional.pem
