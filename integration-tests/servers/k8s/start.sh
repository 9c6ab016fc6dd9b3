#!/usr/bin/env bash
# Start kube-apiserver in the FOREGROUND (exec), HTTPS on 127.0.0.1 only, against the etcd of
# etcd.sh, with static bearer tokens and RBAC. Kill the PID to stop; start it again with the same
# K8S_CERT_DIR and etcd to restart it (watches then resume or re-list).
#
# Environment:
#   K8S_API_PORT     required: HTTPS port on 127.0.0.1
#   K8S_ETCD_URL     required: e.g. http://127.0.0.1:2379
#   K8S_TOKEN_FILE   required: static token CSV (token,user,uid,"group1,group2"); a token in
#                    group system:masters may do anything
#   K8S_CERT_DIR     required: the apiserver writes its self-signed serving certificate here
#                    (apiserver.crt: the CA to trust); the service-account key pair is made here
#                    once (openssl)
#   K8S_BIN          optional: kube-apiserver binary (default: output of ./install.sh)
# Extra command-line arguments are appended.
#
# Ready when `curl -sk -H "Authorization: Bearer $TOKEN" https://127.0.0.1:$K8S_API_PORT/readyz`
# answers "ok" (about 4 s after start on this machine).
set -euo pipefail

die() { printf '[k8s-start] ERROR: %s\n' "$*" >&2; exit 1; }
is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

port="${K8S_API_PORT:-}"
is_port "$port" || die "K8S_API_PORT is required and must be a port: ${port:-<unset>}"
etcd_url="${K8S_ETCD_URL:-}"
[[ "$etcd_url" == http://127.0.0.1:* ]] || die "K8S_ETCD_URL must be http://127.0.0.1:PORT: ${etcd_url:-<unset>}"
tokens="${K8S_TOKEN_FILE:-}"
[[ -n "$tokens" && -r "$tokens" ]] || die "K8S_TOKEN_FILE must name a readable file: ${tokens:-<unset>}"
certs="${K8S_CERT_DIR:-}"
[[ -n "$certs" ]] || die "K8S_CERT_DIR is required"
mkdir -p "$certs" || die "cannot create K8S_CERT_DIR $certs"
if [[ -z "${K8S_BIN:-}" ]]; then
    K8S_BIN="$("${here}/install.sh")" || die "install.sh failed; cannot find kube-apiserver"
fi
[[ -x "$K8S_BIN" ]] || die "K8S_BIN is not an executable file: $K8S_BIN"

if [[ ! -f "$certs/sa.key" ]]; then
    openssl genrsa -out "$certs/sa.key.tmp" 2048 2>/dev/null \
        && openssl rsa -in "$certs/sa.key.tmp" -pubout -out "$certs/sa.pub" 2>/dev/null \
        && mv -f "$certs/sa.key.tmp" "$certs/sa.key" \
        || die "cannot make the service-account key pair in $certs (openssl)"
fi

printf '[k8s-start] %s https=127.0.0.1:%s etcd=%s\n' "$K8S_BIN" "$port" "$etcd_url" >&2
exec "$K8S_BIN" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$port" \
    --cert-dir="$certs" \
    --etcd-servers="$etcd_url" \
    --token-auth-file="$tokens" \
    --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$certs/sa.pub" \
    --service-account-signing-key-file="$certs/sa.key" \
    --service-cluster-ip-range=10.96.0.0/24 \
    "$@"
