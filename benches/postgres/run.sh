#!/usr/bin/env bash
# PostgreSQL baseline for tally's benchmarks: strict, idempotent wallet debits
# done in one plpgsql function (schema.sql), driven by pgbench.
#
#   benches/postgres/run.sh [--json FILE]
#
# Environment:
#   TALLY_PG_SECONDS  measured seconds per case (default 10)
#   TALLY_PG_WARMUP   seconds at the start of each case's pgbench run that are
#                     left out of the figures (default 2)
#   TALLY_PG_RATE     offered rate of the open-loop case, debits/s (default 2000)
#   TALLY_PG_JSON     where to write the JSON (default benches/postgres/last-run.json;
#                     --json FILE wins)
#   TALLY_PG_KEEP_LOGS  if set, a directory to copy pgbench's output and
#                     per-transaction logs (and the server log) into on exit
#   TALLY_PG_URL      libpq URL of a running server to use instead of a
#                     temporary one; it is not stopped, and only its schema
#                     tally_bench is dropped and recreated. If it cannot be
#                     reached, the script says so and uses a temporary server.
#
# With no TALLY_PG_URL it finds (or apt-installs) PostgreSQL, runs initdb in a
# temporary directory, starts a server on 127.0.0.1 on a free port with
# fsync=on and synchronous_commit=on, and stops it and removes the directory
# on exit, whatever happens. See README.md for what the figures mean.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DURATION="${TALLY_PG_SECONDS:-10}"
WARMUP="${TALLY_PG_WARMUP:-2}"
RATE="${TALLY_PG_RATE:-2000}"
COOLDOWN=1   # seconds at the end of each pgbench run left out (teardown; see summarize.py)
JSON_OUT="${TALLY_PG_JSON:-$HERE/last-run.json}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --json) [[ $# -ge 2 ]] || { echo "--json needs a file" >&2; exit 2; }
                JSON_OUT="$2"; shift 2 ;;
        --json=*) JSON_OUT="${1#--json=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done

for v in DURATION WARMUP RATE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'" >&2; exit 2; }
done
[[ $DURATION -ge 1 ]] || { echo "TALLY_PG_SECONDS must be at least 1" >&2; exit 2; }
[[ $RATE -ge 1 ]] || { echo "TALLY_PG_RATE must be at least 1" >&2; exit 2; }
# Resolve the JSON path now, against the caller's directory.
JSON_OUT="$(python3 -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$JSON_OUT")"
[[ -d "$(dirname "$JSON_OUT")" ]] || { echo "no directory for the JSON output: $JSON_OUT" >&2; exit 2; }

log() { printf '[pg-baseline] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

START_TS=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-pg.XXXXXX")"
PGBIN=""
STARTED_SERVER=0
RUN_AS=()   # prefix for commands that must not run as root (initdb, pg_ctl)

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n ${TALLY_PG_KEEP_LOGS:-} ]]; then
        mkdir -p "$TALLY_PG_KEEP_LOGS" \
            && cp -r "$WORK/logs/." "$TALLY_PG_KEEP_LOGS/" 2>/dev/null \
            && { [[ ! -f "$WORK/server.log" ]] || cp "$WORK/server.log" "$TALLY_PG_KEEP_LOGS/"; } \
            && log "logs kept in $TALLY_PG_KEEP_LOGS" || log "warning: could not copy the logs to $TALLY_PG_KEEP_LOGS"
    fi
    if [[ $STARTED_SERVER -eq 1 ]]; then
        if [[ $rc -ne 0 && -f "$WORK/server.log" ]]; then
            log "last lines of the server log:"
            tail -n 20 "$WORK/server.log" >&2 || true
        fi
        if ! "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -m fast -w -t 30 stop >/dev/null 2>&1; then
            log "pg_ctl stop failed; sending SIGQUIT to the postmaster"
            local pid
            pid="$(head -n 1 "$WORK/data/postmaster.pid" 2>/dev/null || true)"
            [[ -n $pid ]] && kill -QUIT "$pid" 2>/dev/null || true
            sleep 1
        fi
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- PostgreSQL binaries -----------------------------------------------------

# Prints the first directory that holds every program named in "$@": first
# where initdb/psql on PATH really live, then /usr/lib/postgresql/*/bin,
# newest version first.
find_pgbin() {
    local cands=() d p tool ok
    for tool in initdb postgres psql pgbench; do
        if p="$(command -v "$tool" 2>/dev/null)"; then
            cands+=("$(dirname "$(readlink -f "$p")")")
        fi
    done
    while IFS= read -r d; do
        [[ -n $d ]] && cands+=("$d")
    done < <(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV)
    for d in "${cands[@]}"; do
        ok=1
        for tool in "$@"; do
            [[ -x "$d/$tool" ]] || { ok=0; break; }
        done
        if [[ $ok -eq 1 ]]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

install_postgres() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and this is not root: install the Debian packages postgresql and postgresql-contrib (or put initdb, pg_ctl, postgres, psql and pgbench on PATH)"
    command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get"
    log "PostgreSQL not found; installing postgresql and postgresql-contrib with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q postgresql postgresql-contrib >"$WORK/apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update and trying again"
        apt-get update -q >>"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get update failed"; }
        apt-get install -y -q postgresql postgresql-contrib >>"$WORK/apt.log" 2>&1 \
            || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get install postgresql failed"; }
    fi
}

SERVER_TOOLS=(initdb pg_ctl postgres psql pgbench)
CLIENT_TOOLS=(psql pgbench)

# --- Server: an existing one (TALLY_PG_URL) or a temporary one ---------------

CONN=()        # extra connection argument for psql/pgbench (the URL, if any)
SOURCE="temporary"
if [[ -n ${TALLY_PG_URL:-} ]]; then
    if PGBIN="$(find_pgbin "${CLIENT_TOOLS[@]}")" \
        && "$PGBIN/psql" -X -Atq -c 'select 1' "$TALLY_PG_URL" >/dev/null 2>&1; then
        CONN=("$TALLY_PG_URL")
        SOURCE="TALLY_PG_URL"
        log "using the running server at TALLY_PG_URL (it will not be stopped)"
    else
        log "warning: TALLY_PG_URL is set but that server cannot be reached with psql; using a temporary server instead"
    fi
fi

if [[ $SOURCE == temporary ]]; then
    PGBIN="$(find_pgbin "${SERVER_TOOLS[@]}")" || {
        install_postgres
        PGBIN="$(find_pgbin "${SERVER_TOOLS[@]}")" || die "PostgreSQL binaries still not found after installing"
    }
    log "PostgreSQL binaries: $PGBIN ($("$PGBIN/postgres" --version))"

    if [[ $(id -u) -eq 0 ]]; then
        # PostgreSQL refuses to run as root: run initdb and the server as the
        # system user postgres (created by the Debian package; made here if
        # the binaries came from elsewhere).
        if ! id -u postgres >/dev/null 2>&1; then
            log "creating system user postgres"
            useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin postgres
        fi
        chown postgres: "$WORK"
        RUN_AS=(runuser -u postgres --)
    fi

    PORT="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')"

    "${RUN_AS[@]}" mkdir "$WORK/data" "$WORK/sock"
    "${RUN_AS[@]}" "$PGBIN/initdb" -D "$WORK/data" -U postgres --auth=trust \
        --encoding=UTF8 --locale=C --no-sync >"$WORK/initdb.log" 2>&1 \
        || { cat "$WORK/initdb.log" >&2; die "initdb failed"; }

    STARTED_SERVER=1
    "${RUN_AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories='$WORK/sock' -c fsync=on -c synchronous_commit=on -c max_connections=200 -c shared_buffers=256MB" \
        start >/dev/null || die "the server did not start"
    log "server started on 127.0.0.1:$PORT, data in $WORK/data"

    # The benchmark connects over TCP loopback, as a service would.
    export PGHOST=127.0.0.1 PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres
    unset PGSERVICE PGPASSWORD PGOPTIONS || true
fi

q() { "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -Atq "$@" "${CONN[@]}"; }

# --- Schema, seed and a functional check -------------------------------------

log "loading schema.sql (schema tally_bench, 100,000 wallets)"
q -f "$HERE/schema.sql"
q -f "$HERE/selftest.sql" >/dev/null || die "selftest.sql failed: debit() does not behave as specified"
log "selftest.sql passed (ok / duplicate / insufficient / refused amount)"

SERVER_VERSION="$(q -c 'show server_version')"
FSYNC="$(q -c 'show fsync')"
SYNC_COMMIT="$(q -c 'show synchronous_commit')"
SHARED_BUFFERS="$(q -c 'show shared_buffers')"
MAX_CONN="$(q -c 'show max_connections')"
PGBENCH_VERSION="$("$PGBIN/pgbench" --version)"
[[ $FSYNC == on && $SYNC_COMMIT == on ]] \
    || log "warning: the server runs with fsync=$FSYNC, synchronous_commit=$SYNC_COMMIT: commits are not durable, figures are not comparable"

# --- Cases ---------------------------------------------------------------------

mkdir -p "$WORK/logs"
: >"$WORK/cases.jsonl"
FAILED_RUNS=0

counts() {  # "<sequence last_value> <ledger rows>"
    q -F ' ' -c 'select (select last_value from tally_bench.req_seq), (select count(*) from tally_bench.ledger)'
}

# run_case NAME CLIENTS MIX RATE   (RATE 0 = closed loop)
run_case() {
    local name=$1 clients=$2 mix=$3 rate=$4
    local script="$HERE/pgbench/$mix.sql"
    local jobs=$(( clients < 2 ? clients : 2 ))
    local args=(-n -M prepared -c "$clients" -j "$jobs" -f "$script")
    # Open loop: pgbench schedules transactions at the given rate (Poisson
    # arrivals) whether or not earlier ones have finished, and logs latency
    # from the scheduled start, so queueing delay is included.
    [[ $rate -gt 0 ]] && args+=(--rate "$rate")

    # Same starting point for every case: dead row versions of the previous
    # case vacuumed, and a checkpoint now rather than in the middle of a run
    # (a checkpoint is not due otherwise: checkpoint_timeout is 5 min).
    q -c 'vacuum (analyze) tally_bench.wallets' -c 'vacuum (analyze) tally_bench.ledger'
    q -c 'checkpoint' 2>/dev/null || true

    # One pgbench run: warm-up + measured + cool-down seconds on the same
    # connections; summarize.py cuts warm-up and cool-down out of the
    # per-transaction log.
    local before after rc=0
    before="$(counts)"
    "$PGBIN/pgbench" "${args[@]}" -T $((WARMUP + DURATION + COOLDOWN)) --log --log-prefix="$WORK/logs/$name.txlog" \
        "${CONN[@]}" >"$WORK/logs/$name.out" 2>&1 || rc=$?
    after="$(counts)"
    if [[ $rc -ne 0 ]]; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        log "warning: pgbench exited $rc for $name:"
        tail -n 15 "$WORK/logs/$name.out" >&2
    fi

    local seq0 led0 seq1 led1
    read -r seq0 led0 <<<"$before"
    read -r seq1 led1 <<<"$after"
    python3 "$HERE/summarize.py" case --name "$name" --clients "$clients" --mix "$mix" \
        --rate "$rate" --seconds "$DURATION" --warmup "$WARMUP" --cooldown "$COOLDOWN" --log-prefix "$WORK/logs/$name.txlog" \
        --pgbench-out "$WORK/logs/$name.out" --exit-code "$rc" \
        --ledger-delta $((led1 - led0)) --calls-delta $((seq1 - seq0)) >>"$WORK/cases.jsonl"
    python3 -c 'import json,sys
c = json.loads(sys.stdin.read().splitlines()[-1])
l = c["latency_us"]
ms = lambda v: "-" if v is None else "%.2f ms" % (v / 1000)
print("[pg-baseline]   %-22s %8s debits/s  p50 %s  p99 %s  errors %d" % (c["name"],
      "-" if c["achieved_rate"] is None else format(round(c["achieved_rate"]), ","),
      ms(l["p50"]), ms(l["p99"]), c["errors"]))' <"$WORK/cases.jsonl" >&2
}

TOTAL_CASES=5
log "running $TOTAL_CASES cases, ${WARMUP} s warm-up + ${DURATION} s measured + ${COOLDOWN} s cool-down each"
run_case "uniform_c1"  1  uniform 0
run_case "uniform_c8"  8  uniform 0
run_case "uniform_c64" 64 uniform 0
run_case "hot_c64"     64 hot     0
run_case "open_uniform_c64_r${RATE}" 64 uniform "$RATE"

# --- Consistency after all runs ------------------------------------------------

# Money is conserved: what left the wallets is exactly what the ledger holds.
CONSERVED="$(q -c 'select (select total from tally_bench.seeded) - (select sum(balance) from tally_bench.wallets)
                         = (select coalesce(sum(amount), 0) from tally_bench.ledger)')"
LEDGER_ROWS="$(q -c 'select count(*) from tally_bench.ledger')"
NEGATIVE="$(q -c 'select count(*) from tally_bench.wallets where balance < 0')"

python3 - "$WORK/meta.json" <<EOF
import json, os, sys, time
meta = {
    "benchmark": "tally PostgreSQL baseline: strict idempotent debits in one plpgsql function",
    "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "seconds": $DURATION,
    "warmup_seconds": $WARMUP,
    "cooldown_seconds": $COOLDOWN,
    "cpus": os.cpu_count(),
    "server": {
        "source": "$SOURCE",
        "version": "$SERVER_VERSION",
        "fsync": "$FSYNC",
        "synchronous_commit": "$SYNC_COMMIT",
        "shared_buffers": "$SHARED_BUFFERS",
        "max_connections": int("$MAX_CONN"),
        "connection": "tcp 127.0.0.1" if "$SOURCE" == "temporary" else "TALLY_PG_URL",
    },
    "pgbench": "$PGBENCH_VERSION",
    "checks": {
        "money_conserved": "$CONSERVED" == "t",
        "ledger_rows": int("$LEDGER_ROWS"),
        "negative_balances": int("$NEGATIVE"),
        "pgbench_runs_failed": $FAILED_RUNS,
    },
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f)
EOF

python3 "$HERE/summarize.py" report --cases "$WORK/cases.jsonl" --meta "$WORK/meta.json" --json "$JSON_OUT"
log "done in $(( $(date +%s) - START_TS )) s"

[[ $CONSERVED == t && $NEGATIVE -eq 0 ]] || die "consistency check failed: money_conserved=$CONSERVED negative_balances=$NEGATIVE"
[[ $FAILED_RUNS -eq 0 ]] || die "$FAILED_RUNS pgbench run(s) failed"
