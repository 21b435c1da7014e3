# Shell side shared by scripts/bench_ota.sh and scripts/bench_rollout.sh (sourced, not run):
# logging, a private temp dir with a copy of the binary, and a cleanup that stops the Python
# driver and every process it recorded in $WORK/pids on exit, error, SIGINT or SIGTERM.
#
# bench_setup NAME: sets ROOT, BIN, WORK, BIN_BUILT, REV, DIRTY.
# bench_run_driver: runs $WORK/driver.py (which imports benchlib.py) and waits for it.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$BENCH_NAME" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bench_cleanup() {
    local rc=$?
    set +e
    trap - INT TERM
    local pids=()
    [[ -n $PYPID ]] && pids+=("$PYPID")
    # every process the python driver started, one pid per line
    [[ -f $WORK/pids ]] && mapfile -t -O "${#pids[@]}" pids < "$WORK/pids"
    for p in "${pids[@]}"; do
        [[ $p =~ ^[0-9]+$ ]] || continue
        kill -TERM "$p" 2>/dev/null
    done
    for p in "${pids[@]}"; do
        [[ $p =~ ^[0-9]+$ ]] || continue
        for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null
    done
    if [[ ${BENCH_KEEP:-} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}

bench_setup() {
    BENCH_NAME=$1
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    BIN=${FWREPO_BIN:-$ROOT/target/release/fwrepo}
    [[ -x $BIN ]] || die "no binary at $BIN; run: cargo build --release"
    command -v python3 >/dev/null || die "python3 is required"
    WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/fwrepo-${BENCH_NAME//_/-}.XXXXXX")
    PYPID=
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    # A private copy, so a rebuild during the run cannot swap the binary between processes.
    cp "$BIN" "$WORK/fwrepo"
    BIN_BUILT=$(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC')
    REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    DIRTY=$(git -C "$ROOT" status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l)
}

# Sets and exports MOSQ (MOSQUITTO_BIN, else /usr/sbin/mosquitto, else PATH); dies if the
# brokers asked for (BENCH_BROKERS) include Mosquitto and there is none.
bench_find_mosquitto() {
    MOSQ=${MOSQUITTO_BIN:-}
    if [[ -z $MOSQ ]]; then
        if [[ -x /usr/sbin/mosquitto ]]; then MOSQ=/usr/sbin/mosquitto; else MOSQ=$(command -v mosquitto || true); fi
    fi
    case ${BENCH_BROKERS:-embedded,mosquitto} in
        *mosquitto*) [[ -n $MOSQ && -x $MOSQ ]] || die "mosquitto not found (set MOSQUITTO_BIN or BENCH_BROKERS=embedded)" ;;
    esac
    export MOSQ
}

bench_run_driver() {
    log "binary $BIN (built $BIN_BUILT, HEAD $REV), temp dir $WORK"
    export WORK REV BIN_BUILT DIRTY
    SCRIPTS="$ROOT/scripts" python3 "$WORK/driver.py" &
    PYPID=$!
    wait "$PYPID"
}
