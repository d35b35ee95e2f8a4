#!/usr/bin/env bash
# Local S3 servers for the backup-target tests.
#
#   scripts/s3-server.sh install
#       cargo-installs s3s-fs 0.14.1 into target/tools/bin (skipped when present;
#       0.15+ needs a newer rustc). About 2 minutes on 2 cores.
#   scripts/s3-server.sh start DIR PORT ACCESS SECRET [DOMAIN]
#       starts s3s-fs on 127.0.0.1:PORT storing buckets as directories of DIR
#       (a bucket is created with `mkdir DIR/BUCKET`), SigV4 with ACCESS/SECRET,
#       virtual-hosted style for Host: BUCKET.DOMAIN (default localhost:PORT; s3s
#       compares the whole Host header, port included); waits until it answers
#       and prints its pid. Log: DIR.log
#   scripts/s3-server.sh stop PID
#   scripts/s3-server.sh install-moto
#       Python venv with moto[server] and lz4 in target/tools/moto (TLS S3 for the
#       custom-CA test; skipped when present).
#   scripts/s3-server.sh tls-certs DIR
#       openssl CA (DIR/ca.pem) and a server cert for 127.0.0.1/localhost
#       (DIR/server.pem, DIR/server.key).
#   scripts/s3-server.sh start-moto-tls CERTDIR PORT
#       moto on https://127.0.0.1:PORT with CERTDIR/server.{pem,key}; prints its pid.
#
# Environment: CAIRN_TOOLS overrides target/tools.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tools=${CAIRN_TOOLS:-$repo/target/tools}
s3s=$tools/bin/s3s-fs
moto=$tools/moto

wait_port() { # PORT PID SCHEME
    local i
    for i in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || return 1
        if curl -s -k -o /dev/null "$3://127.0.0.1:$1/"; then return 0; fi
        sleep 0.1
    done
    return 1
}

case "${1:-}" in
install)
    if [[ -x $s3s ]]; then
        echo "s3s-fs: $s3s (cached)"
        exit 0
    fi
    cargo install s3s-fs@0.14.1 --features binary --locked --root "$tools"
    ;;
start)
    [[ $# -ge 5 ]] || { echo "usage: $0 start DIR PORT ACCESS SECRET [DOMAIN]" >&2; exit 2; }
    dir=$2 port=$3 access=$4 secret=$5 domain=${6:-localhost:$port}
    [[ -x $s3s ]] || { echo "s3s-fs missing: run scripts/s3-server.sh install" >&2; exit 1; }
    mkdir -p "$dir"
    "$s3s" --host 127.0.0.1 --port "$port" --access-key "$access" --secret-key "$secret" \
        --domain "$domain" "$dir" >"$dir.log" 2>&1 &
    pid=$!
    if ! wait_port "$port" "$pid" http; then
        echo "s3s-fs did not start on port $port:" >&2
        tail -n 20 "$dir.log" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "$pid"
    ;;
stop)
    [[ $# -eq 2 ]] || { echo "usage: $0 stop PID" >&2; exit 2; }
    kill "$2" 2>/dev/null || true
    ;;
install-moto)
    # The venv also carries python's lz4 for the backupstore compatibility
    # script (daemon/tests/fixtures/longhorn_backupstore.py).
    if [[ -x $moto/bin/moto_server ]] && "$moto/bin/python" -c 'import lz4.frame' 2>/dev/null; then
        echo "moto: $moto (cached)"
        exit 0
    fi
    python3 -m venv "$moto" || { echo "python3 venv failed: apt-get install python3-venv" >&2; exit 1; }
    "$moto/bin/pip" install --quiet 'moto[server]' lz4
    ;;
tls-certs)
    [[ $# -eq 2 ]] || { echo "usage: $0 tls-certs DIR" >&2; exit 2; }
    d=$2
    mkdir -p "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=cairn test CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
        -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$d/ext.cnf"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
        -days 2 -extfile "$d/ext.cnf" -out "$d/server.pem" 2>/dev/null
    ;;
start-moto-tls)
    [[ $# -eq 3 ]] || { echo "usage: $0 start-moto-tls CERTDIR PORT" >&2; exit 2; }
    d=$2 port=$3
    [[ -x $moto/bin/moto_server ]] || { echo "moto missing: run scripts/s3-server.sh install-moto" >&2; exit 1; }
    "$moto/bin/moto_server" -H 127.0.0.1 -p "$port" -c "$d/server.pem" -k "$d/server.key" \
        >"$d/moto.log" 2>&1 &
    pid=$!
    if ! wait_port "$port" "$pid" https; then
        echo "moto did not start on port $port:" >&2
        tail -n 20 "$d/moto.log" >&2
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    echo "$pid"
    ;;
*)
    sed -n '2,24p' "$0" >&2
    exit 2
    ;;
esac
