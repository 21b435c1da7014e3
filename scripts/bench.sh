#!/usr/bin/env bash
# fwrepo benchmark: upload vs. hashing limit, download vs. nginx sendfile, peak server RSS under
# a 4 GiB upload and under 200 concurrent range clients, and range latency at offset 0 vs 600 MB.
#
# Usage: scripts/bench.sh            (needs a release build: cargo build --release)
#
# Everything runs on 127.0.0.1 with ports the kernel picks; all temporary files live in one
# directory (under $BENCH_TMP, default /tmp) that is removed on exit. Progress goes to stderr,
# the markdown report to stdout (and to $BENCH_REPORT if set).
#
# Environment knobs (defaults in brackets):
#   FWREPO_BIN      server binary            [target/release/fwrepo]
#   BENCH_TMP       parent of the temp dir   [/tmp]
#   BENCH_REPORT    also write the report to this file
#   BENCH_ROUNDS    best-of count for the 1 GiB upload and hashing timings     [3]
#   BENCH_DL_ROUNDS best-of count for the 1 GiB downloads (fwrepo, nginx alternate) [7]
#   BENCH_LAT_ROUNDS  rounds of 80 parallel ranges per offset                  [10]
#   BENCH_SKIP_NGINX=1  skip the nginx comparison (no apt-get)
#   BENCH_SKIP_TMPFS=1  skip the diagnostic upload into a tmpfs data dir (/dev/shm)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FWREPO_BIN:-$ROOT/target/release/fwrepo}
ROUNDS=${BENCH_ROUNDS:-3}
DL_ROUNDS=${BENCH_DL_ROUNDS:-7}
LAT_ROUNDS=${BENCH_LAT_ROUNDS:-10}
GIB=$((1 << 30))
SMALL_SIZE=$GIB            # the 1 GiB file
BIG_SIZE=$((4 * GIB))      # the 4 GiB upload
RSS_CLIENTS=200 RSS_REQS=5 # 200 clients x 5 random 1 MiB ranges
LAT_CLIENTS=80 LAT_FAR=600000000
RANGE=$((1 << 20))

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -x $BIN ]] || die "no server binary at $BIN; run: cargo build --release"
for t in curl openssl python3; do command -v "$t" >/dev/null || die "$t is required"; done

WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/fwrepo-bench.XXXXXX")
SHM=
PIDS=()
cleanup() {
    local rc=$?
    set +e
    for p in "${PIDS[@]}"; do
        if kill -0 "$p" 2>/dev/null; then
            kill -TERM "$p" 2>/dev/null
            for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$p" 2>/dev/null
        fi
    done
    if [[ -f $WORK/nginx/nginx.pid ]]; then
        kill -TERM "$(cat "$WORK/nginx/nginx.pid")" 2>/dev/null
    fi
    rm -rf "$WORK" ${SHM:+"$SHM"}
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers

now() { date +%s.%N; }
# calc EXPR: floating point arithmetic via python
calc() { python3 -c "print($1)"; }
fmt() { python3 -c "print(f'{$1:$2}')"; }

free_port() {
    python3 - <<'EOF'
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p not in (1883, 8080):
        print(p); break
EOF
}

# make_random FILE BYTES: fast pseudo-random content (AES-CTR keystream, random key per run)
make_random() {
    local key
    key=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    { openssl enc -aes-128-ctr -K "$key" -iv 00000000000000000000000000000000 </dev/zero 2>/dev/null || true; } \
        | head -c "$2" >"$1"
    [[ $(stat -c %s "$1") -eq $2 ]] || die "could not generate $1"
}

# start_server NAME DATADIR [extra flags...]: sets SRV_PID and SRV_URL
start_server() {
    local name=$1 dir=$2; shift 2

    for _attempt in 1 2 3; do
        "$BIN" serve --data-dir "$dir" --listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 --shutdown-grace 2 "$@" \
            >"$WORK/$name.out" 2>"$WORK/$name.err" &
        SRV_PID=$!
        PIDS+=("$SRV_PID")
        SRV_URL=
        for _ in $(seq 1 200); do
            SRV_URL=$(sed -n 's|^HTTP listening on \(http://[^ ]*\).*|\1|p' "$WORK/$name.out" | head -n1)
            [[ -n $SRV_URL ]] && break
            kill -0 "$SRV_PID" 2>/dev/null || die "server $name exited: $(tail -n5 "$WORK/$name.err")"
            sleep 0.05
        done
        [[ -n $SRV_URL ]] || die "server $name did not report its address"
        case ${SRV_URL##*:} in
            1883|8080) log "server got port ${SRV_URL##*:}, which we must not use; restarting"
                       stop_server "$SRV_PID" ;;
            *) TOKEN=$(cat "$dir/admin.token")   # the API and /files/ need a token
               export BENCH_TOKEN=$TOKEN
               log "server $name (pid $SRV_PID) at $SRV_URL"; return 0 ;;
        esac
    done
    die "could not get a usable port"
}

stop_server() {
    local p=$1
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}

# vm_kib PID FIELD: a /proc/PID/status field in KiB (VmHWM, VmRSS)
vm_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }

# upload FILE NAME: prints "SECONDS URL MD5 SHA256 SIZE"
upload() {
    local out=$WORK/upload.json t
    t=$(curl -sS --fail-with-body -H "Authorization: Bearer $TOKEN" -T "$1" -o "$out" -w '%{time_total}' \
        "$SRV_URL/api/v1/firmware?file_name=$2") || die "upload of $2 failed: $(cat "$out" 2>/dev/null)"
    python3 - "$out" "$t" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
j = j.get("firmware", j) if "file_url" not in j else j
print(sys.argv[2], j["file_url"], j["md5"], j["sha256"], j["file_size"])
EOF
}

# download URL: prints "SECONDS BYTES"
download() {
    curl -sS --fail -H "Authorization: Bearer $TOKEN" -o /dev/null -w '%{time_total} %{size_download}\n' "$1"
}

# the load generator (asyncio, raw HTTP/1.1 over sockets)
cp "$ROOT/scripts/bench_load.py" "$WORK/load.py"

# ---------------------------------------------------------------- machine

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | awk '{ print $2 }' | tr '\n' ' ')
if [[ -n $DIRTY ]]; then
    COMMIT="$COMMIT (working tree has uncommitted changes: ${DIRTY% })"
fi
STALE=$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$BIN" -type f 2>/dev/null | wc -l)
BIN_NOTE="binary built $(date -r "$BIN" '+%Y-%m-%d %H:%M')"
if [[ $STALE -gt 0 ]]; then
    BIN_NOTE="$BIN_NOTE, older than $STALE source file(s): rebuild with cargo build --release"
    log "WARNING: $BIN is older than $STALE source file(s); the numbers describe the old build"
fi
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
CPU_FLAGS=$(grep -m1 -o -w -e sha_ni -e avx2 -e avx512f /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
MEM_GIB=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
KERNEL=$(uname -sr)
NPROC=$(nproc)
OPENSSL_V=$(openssl version | awk '{ print $1, $2 }')
CURL_V=$(curl --version | awk 'NR == 1 { print $1, $2 }')
FS=$(df -T "$WORK" | awk 'NR == 2 { print $2 }')
log "load average $LOADAVG"
log "fwrepo $COMMIT, $BIN_NOTE; $NPROC x $CPU; ${MEM_GIB} GiB; $KERNEL; temp dir $WORK ($FS)"

# ---------------------------------------------------------------- 1. upload vs hashing limit

SRC=$WORK/src-1g.bin
log "generating 1 GiB of random data"
make_random "$SRC" "$SMALL_SIZE"
cat "$SRC" >/dev/null
sync   # no dirty data of ours left for a later fsync to pay for

# context: fwrepo fsyncs each blob, so the disk bounds a durable upload too
log "context: copying 1 GiB to the temp file system with fdatasync"
t0=$(now)
dd if="$SRC" of="$WORK/dd.bin" bs=1M conv=fdatasync status=none
DD_T=$(calc "$(now) - $t0")
rm -f "$WORK/dd.bin"
sync
log "  ${DD_T}s"

log "hashing limit: openssl md5 and sha256 in parallel, best of $ROUNDS"
HASH_BEST=
for i in $(seq 1 "$ROUNDS"); do
    t0=$(now)
    openssl dgst -md5 -r "$SRC" >"$WORK/md5.txt" & p1=$!
    openssl dgst -sha256 -r "$SRC" >"$WORK/sha.txt" & p2=$!
    wait "$p1" "$p2"
    t=$(calc "$(now) - $t0")
    log "  hash round $i: ${t}s"
    HASH_BEST=$(calc "min($t, ${HASH_BEST:-$t})")
done
SRC_MD5=$(cut -d' ' -f1 "$WORK/md5.txt")
SRC_SHA=$(cut -d' ' -f1 "$WORK/sha.txt")

DATA=$WORK/data
mkdir -p "$DATA"
start_server main "$DATA"
MAIN_TOKEN=$TOKEN
MAIN_PID=$SRV_PID
log "uploading the 1 GiB file, best of $ROUNDS (curl -T, fresh version each time)"
UP_BEST='' FILE_URL=''
for i in $(seq 1 "$ROUNDS"); do
    sync
    read -r t url md5 sha size < <(upload "$SRC" "bench_1.0.$i.zip")
    [[ $md5 == "$SRC_MD5" && $sha == "$SRC_SHA" && $size == "$SMALL_SIZE" ]] \
        || die "upload $i answered md5 $md5 sha256 $sha size $size; expected $SRC_MD5 $SRC_SHA $SMALL_SIZE"
    log "  upload round $i: ${t}s -> $url"
    UP_BEST=$(calc "min($t, ${UP_BEST:-$t})")
    FILE_URL=$url
done
UP_RATIO=$(calc "$HASH_BEST / $UP_BEST")

# diagnostic (no target): the same uploads into a data dir on tmpfs, i.e. without the disk
SHM_BEST=
SHM_FREE_KIB=$(df -k --output=avail /dev/shm 2>/dev/null | tail -n1 || echo 0)
if [[ ${BENCH_SKIP_TMPFS:-0} != 1 && ${SHM_FREE_KIB:-0} -gt $(( (ROUNDS + 2) * SMALL_SIZE / 1024 )) ]]; then
    SHM=$(mktemp -d /dev/shm/fwrepo-bench.XXXXXX)
    start_server shm "$SHM/data"
    log "diagnostic: the same upload into a data dir on tmpfs ($SHM), best of $ROUNDS"
    for i in $(seq 1 "$ROUNDS"); do
        read -r t _url md5 _sha _size < <(upload "$SRC" "bench_1.1.$i.zip")
        [[ $md5 == "$SRC_MD5" ]] || die "tmpfs upload $i answered md5 $md5"
        log "  tmpfs upload round $i: ${t}s"
        SHM_BEST=$(calc "min($t, ${SHM_BEST:-$t})")
    done
    stop_server "$SRV_PID"
    rm -rf "$SHM"
    # Back to the main server's token (downloads below go to the main server).
    TOKEN=$MAIN_TOKEN
    export BENCH_TOKEN=$TOKEN
fi

# ---------------------------------------------------------------- 2. download vs nginx sendfile

BLOB=$(find "$DATA/blobs" -type f -size "$((SMALL_SIZE / 1024))k" 2>/dev/null | head -n1 || true)
[[ -n $BLOB ]] || BLOB=$SRC
cat "$BLOB" >/dev/null   # make sure the blob is in the page cache

NGX_URL=
if [[ ${BENCH_SKIP_NGINX:-0} != 1 ]]; then
    if ! command -v nginx >/dev/null; then
        log "installing nginx"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx) >&2 \
            || die "nginx is missing and could not be installed"
    fi
    NGX=$WORK/nginx
    mkdir -p "$NGX/www" "$NGX/logs"
    ln -s "$BLOB" "$NGX/www/fw.bin"   # the very file fwrepo serves
    NGX_PORT=$(free_port)
    USER_LINE=
    [[ $(id -u) -eq 0 ]] && USER_LINE="user root;"
    cat >"$NGX/nginx.conf" <<NGINX
$USER_LINE
worker_processes 1;
pid $NGX/nginx.pid;
error_log $NGX/logs/error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $NGX/tmp_body;
    proxy_temp_path $NGX/tmp_proxy;
    fastcgi_temp_path $NGX/tmp_fastcgi;
    uwsgi_temp_path $NGX/tmp_uwsgi;
    scgi_temp_path $NGX/tmp_scgi;
    types { application/octet-stream bin; }
    server {
        listen 127.0.0.1:$NGX_PORT;
        root $NGX/www;
    }
}
NGINX
    nginx -e "$NGX/logs/error.log" -p "$NGX" -c "$NGX/nginx.conf" -g 'daemon off;' &
    NGX_PID=$!
    PIDS+=("$NGX_PID")
    NGX_URL=http://127.0.0.1:$NGX_PORT/fw.bin
    for _ in $(seq 1 100); do
        curl -s -o /dev/null --max-time 1 -I "$NGX_URL" && break
        kill -0 "$NGX_PID" 2>/dev/null || die "nginx exited: $(cat "$NGX/logs/error.log")"
        sleep 0.1
    done
    log "nginx (pid $NGX_PID) at $NGX_URL, sendfile on"
fi

log "downloading the 1 GiB file, fwrepo${NGX_URL:+ and nginx alternately}, best of $DL_ROUNDS"
download "$FILE_URL" >/dev/null   # warm-up
[[ -n $NGX_URL ]] && download "$NGX_URL" >/dev/null
DL_BEST='' NGX_BEST=''
for i in $(seq 1 "$DL_ROUNDS"); do
    read -r t n < <(download "$FILE_URL")
    [[ $n == "$SMALL_SIZE" ]] || die "fwrepo download returned $n bytes"
    DL_BEST=$(calc "min($t, ${DL_BEST:-$t})")
    msg="  round $i: fwrepo ${t}s"
    if [[ -n $NGX_URL ]]; then
        read -r t n < <(download "$NGX_URL")
        [[ $n == "$SMALL_SIZE" ]] || die "nginx download returned $n bytes"
        NGX_BEST=$(calc "min($t, ${NGX_BEST:-$t})")
        msg="$msg, nginx ${t}s"
    fi
    log "$msg"
done
DL_GBPS=$(calc "$SMALL_SIZE / $DL_BEST / 1e9")
NGX_GBPS='' DL_RATIO=''
if [[ -n $NGX_URL ]]; then
    stop_server "$NGX_PID"
    NGX_GBPS=$(calc "$SMALL_SIZE / $NGX_BEST / 1e9")
    DL_RATIO=$(calc "$NGX_BEST / $DL_BEST")
fi

# ---------------------------------------------------------------- 4. latency at offset 0 vs 600 MB

log "latency: $LAT_CLIENTS parallel 1 MiB ranges at offset 0 and $LAT_FAR, $LAT_ROUNDS rounds each"
LAT_JSON=$(python3 "$WORK/load.py" lat "$FILE_URL" --total "$SMALL_SIZE" --size "$RANGE" \
    --clients "$LAT_CLIENTS" --rounds "$LAT_ROUNDS" --offsets "0,$LAT_FAR")
log "  $LAT_JSON"
read -r LAT0 LATFAR < <(python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(j['0']['mean']*1e3, j['$LAT_FAR']['mean']*1e3)" "$LAT_JSON")
LAT_RATIO=$(calc "max($LAT0, $LATFAR) / min($LAT0, $LATFAR)")
stop_server "$MAIN_PID"

# ---------------------------------------------------------------- 3a. RSS under 200 range clients

start_server ranges "$DATA"
FILE_URL=$SRV_URL/${FILE_URL#http://*/}   # same firmware, new server's address
IDLE_KIB=$(vm_kib "$SRV_PID" VmHWM)
log "peak RSS: $RSS_CLIENTS clients x $RSS_REQS random 1 MiB ranges (idle server: $IDLE_KIB KiB)"
RSS_JSON=$(python3 "$WORK/load.py" rss "$FILE_URL" --total "$SMALL_SIZE" --size "$RANGE" \
    --clients "$RSS_CLIENTS" --reqs "$RSS_REQS" --verify "$SRC")
RANGE_HWM_KIB=$(vm_kib "$SRV_PID" VmHWM)
log "  $RSS_JSON; VmHWM $RANGE_HWM_KIB KiB"
read -r RSS_OK RSS_REQ RSS_SECS < <(python3 -c "import json,sys; j=json.loads(sys.argv[1]); print(j['ok'], j['requests'], j['seconds'])" "$RSS_JSON")
[[ $RSS_OK == "$RSS_REQ" ]] || die "range load: only $RSS_OK of $RSS_REQ requests were correct: $RSS_JSON"
stop_server "$SRV_PID"
rm -rf "$DATA" "$SRC"   # free the disk before the 4 GiB part

# ---------------------------------------------------------------- 3b. RSS during a 4 GiB upload

BIG=$WORK/src-4g.bin
log "generating 4 GiB of random data"
make_random "$BIG" "$BIG_SIZE"
sync
BIG_DATA=$WORK/data-4g
mkdir -p "$BIG_DATA"
start_server big "$BIG_DATA"
log "peak RSS: uploading 4 GiB"
read -r BIG_T _url _md5 _sha BIG_SIZE_SRV < <(upload "$BIG" "bench_4.0.0.zip")
[[ $BIG_SIZE_SRV == "$BIG_SIZE" ]] || die "4 GiB upload stored $BIG_SIZE_SRV bytes"
BIG_HWM_KIB=$(vm_kib "$SRV_PID" VmHWM)
log "  4 GiB upload: ${BIG_T}s, VmHWM $BIG_HWM_KIB KiB"
stop_server "$SRV_PID"
rm -rf "$BIG" "$BIG_DATA"

# ---------------------------------------------------------------- report

met() { if python3 -c "import sys; sys.exit(0 if ($1) else 1)"; then echo yes; else echo "**no**"; fi; }
mib() { calc "round($1 / 1024, 1)"; }

UP_GBPS=$(calc "$SMALL_SIZE / $UP_BEST / 1e9")
HASH_GBPS=$(calc "$SMALL_SIZE / $HASH_BEST / 1e9")
SHM_ROW=
if [[ -n $SHM_BEST ]]; then
    SHM_ROW="| *Diagnostic:* same upload with the data dir on tmpfs (no disk, no fsync cost) | $(fmt "$SHM_BEST" .2f) s ($(fmt "$SMALL_SIZE / $SHM_BEST / 1e9" .2f) GB/s): limit/upload = $(fmt "$HASH_BEST / $SHM_BEST" .2f) | (none) | – |"
fi
if [[ -n $DL_RATIO ]]; then
    NGX_ROW="| Download 1 GiB (curl -o /dev/null, best of $DL_ROUNDS): fwrepo / nginx (sendfile on) | $(fmt "$DL_GBPS" .2f) / $(fmt "$NGX_GBPS" .2f) GB/s = $(fmt "$DL_RATIO" .2f) | ≥ 0.90 | $(met "$DL_RATIO >= 0.9") |"
else
    NGX_ROW="| Download 1 GiB (curl -o /dev/null, best of $DL_ROUNDS): fwrepo (nginx skipped) | $(fmt "$DL_GBPS" .2f) GB/s | ratio ≥ 0.90 | n/a |"
fi
NGX_ROW="${SHM_ROW:+$SHM_ROW$'\n'}$NGX_ROW"

REPORT=$(cat <<MD
### Run of $(date -u '+%Y-%m-%d %H:%M UTC'), fwrepo $COMMIT

Server: $BIN_NOTE. Run took ${SECONDS} s; load average at the start: $LOADAVG, at the end: $(cut -d' ' -f1-3 /proc/loadavg).

Machine: $NPROC × $CPU (${CPU_FLAGS% }), ${MEM_GIB} GiB RAM, $KERNEL; temp files on $FS; $OPENSSL_V, $CURL_V.

| Metric | Measured | Target | Met? |
|---|---|---|---|
| Upload 1 GiB (curl -T, best of $ROUNDS) vs hashing limit (openssl md5 ∥ sha256) | $(fmt "$UP_BEST" .2f) s ($(fmt "$UP_GBPS" .2f) GB/s) vs $(fmt "$HASH_BEST" .2f) s ($(fmt "$HASH_GBPS" .2f) GB/s): limit/upload = $(fmt "$UP_RATIO" .2f) | ≥ 0.80 | $(met "$UP_RATIO >= 0.8") |
$NGX_ROW
| Peak server RSS (VmHWM), 4 GiB upload | $(mib "$BIG_HWM_KIB") MiB (upload took $(fmt "$BIG_T" .1f) s) | ≤ 256 MiB | $(met "$BIG_HWM_KIB <= 256 * 1024") |
| Peak server RSS (VmHWM), $RSS_CLIENTS clients × $RSS_REQS random 1 MiB ranges (all 206, lengths and bytes checked) | $(mib "$RANGE_HWM_KIB") MiB (idle $(mib "$IDLE_KIB") MiB; $RSS_REQ requests in $(fmt "$RSS_SECS" .1f) s) | ≤ 256 MiB | $(met "$RANGE_HWM_KIB <= 256 * 1024") |
| Mean latency, $LAT_CLIENTS parallel 1 MiB ranges at offset 0 vs $((LAT_FAR / 1000000)) MB ($LAT_ROUNDS rounds) | $(fmt "$LAT0" .1f) ms vs $(fmt "$LATFAR" .1f) ms: ratio $(fmt "$LAT_RATIO" .2f) | ≤ 1.5 | $(met "$LAT_RATIO <= 1.5") |

Context: hashing limit = wall time of \`openssl dgst -md5\` and \`-sha256\` run in parallel on the cached file (best of $ROUNDS); copying the same 1 GiB with \`dd conv=fdatasync\` to the temp file system took $(fmt "$DD_T" .2f) s (fwrepo fsyncs every blob before answering).
MD
)
printf '%s\n' "$REPORT"
if [[ -n ${BENCH_REPORT:-} ]]; then printf '%s\n' "$REPORT" >"$BENCH_REPORT"; fi
log "done in ${SECONDS}s"
