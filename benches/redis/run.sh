#!/usr/bin/env bash
# Redis baseline for tally's benchmarks: strict, idempotent wallet debits done
# in one Lua script (wallet.lua), durable with appendfsync always, driven by
# redis-benchmark.
#
#   benches/redis/run.sh [--json FILE]
#
# Environment:
#   TALLY_REDIS_SECONDS  measured seconds per case, roughly (default 10): the
#                        measured run is a fixed number of requests, sized from
#                        the rate of the warm-up run
#   TALLY_REDIS_WARMUP   seconds of the warm-up run before each case (default 2)
#   TALLY_REDIS_WALLETS  wallets prepared (default 100000, at least 100)
#   TALLY_REDIS_THREADS  redis-benchmark --threads (default: not given, one thread)
#   TALLY_REDIS_JSON     where to write the JSON (default
#                        benches/redis/last-run.json; --json FILE wins)
#   TALLY_REDIS_KEEP_LOGS  if set, a directory to copy redis-benchmark's output
#                        and the server log into on exit
#
# It finds redis-server, redis-cli and redis-benchmark (or apt-installs the
# Debian package redis-server), starts a server on 127.0.0.1 on a free port in
# a temporary directory with appendonly yes, appendfsync always and no RDB
# snapshots, and stops it and removes the directory on exit, whatever happens.
# See README.md for what the figures mean.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DURATION="${TALLY_REDIS_SECONDS:-10}"
WARMUP="${TALLY_REDIS_WARMUP:-2}"
WALLETS="${TALLY_REDIS_WALLETS:-100000}"
THREADS="${TALLY_REDIS_THREADS:-}"
JSON_OUT="${TALLY_REDIS_JSON:-$HERE/last-run.json}"
AMOUNT=1000                # minor units per debit (0.001 at 6 decimals, as the smallest PostgreSQL debit)
SEED_BALANCE=1000000000000 # minor units per wallet: 1,000,000 at 6 decimals; a debit takes 1000
TTL=86400                  # the event keys' TTL, as in wallet.lua

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

for v in DURATION WARMUP WALLETS; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'" >&2; exit 2; }
done
[[ $DURATION -ge 1 ]] || { echo "TALLY_REDIS_SECONDS must be at least 1" >&2; exit 2; }
[[ $WARMUP -ge 1 ]] || { echo "TALLY_REDIS_WARMUP must be at least 1 (the warm-up run sizes the measured one)" >&2; exit 2; }
[[ $WALLETS -ge 100 ]] || { echo "TALLY_REDIS_WALLETS must be at least 100" >&2; exit 2; }
[[ -z $THREADS || $THREADS =~ ^[1-9][0-9]*$ ]] || { echo "TALLY_REDIS_THREADS must be a positive number" >&2; exit 2; }
JSON_OUT="$(python3 -c 'import os,sys; print(os.path.abspath(sys.argv[1]))' "$JSON_OUT")"
[[ -d "$(dirname "$JSON_OUT")" ]] || { echo "no directory for the JSON output: $JSON_OUT" >&2; exit 2; }

log() { printf '[redis-baseline] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

START_TS=$(date +%s)
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tally-redis.XXXXXX")"
REDIS_PID=""
POLICY_RC=""   # /usr/sbin/policy-rc.d, if this script put it there for the install

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -z $POLICY_RC ]] || rm -f "$POLICY_RC"
    if [[ -n ${TALLY_REDIS_KEEP_LOGS:-} ]]; then
        mkdir -p "$TALLY_REDIS_KEEP_LOGS" \
            && cp -r "$WORK/logs/." "$TALLY_REDIS_KEEP_LOGS/" 2>/dev/null \
            && { [[ ! -f "$WORK/redis.log" ]] || cp "$WORK/redis.log" "$TALLY_REDIS_KEEP_LOGS/"; } \
            && log "logs kept in $TALLY_REDIS_KEEP_LOGS" || log "warning: could not copy the logs to $TALLY_REDIS_KEEP_LOGS"
    fi
    if [[ -n $REDIS_PID ]] && kill -0 "$REDIS_PID" 2>/dev/null; then
        if [[ $rc -ne 0 && -f "$WORK/redis.log" ]]; then
            log "last lines of the server log:"
            tail -n 20 "$WORK/redis.log" >&2 || true
        fi
        # SIGTERM: redis-server fsyncs the AOF and exits.
        kill -TERM "$REDIS_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 100); do
            kill -0 "$REDIS_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$REDIS_PID" 2>/dev/null; then
            log "redis-server did not stop in 10 s; sending SIGKILL"
            kill -KILL "$REDIS_PID" 2>/dev/null || true
        fi
        wait "$REDIS_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- Redis binaries --------------------------------------------------------------

TOOLS=(redis-server redis-cli redis-benchmark)
have_tools() {
    local t
    for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null || return 1; done
}

install_redis() {
    [[ $(id -u) -eq 0 ]] || die "Redis is not installed and this is not root: install the Debian package redis-server (or put redis-server, redis-cli and redis-benchmark on PATH)"
    command -v apt-get >/dev/null || die "Redis is not installed and there is no apt-get"
    log "Redis not found; installing redis-server with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    # The package starts its own service on port 6379 where an init system runs;
    # this script would not stop that one, so it tells the maintainer scripts not
    # to start it (policy-rc.d, removed again right after the install).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        POLICY_RC=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
    fi
    if ! apt-get install -y -q redis-server >"$WORK/apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update and trying again"
        apt-get update -q >>"$WORK/apt.log" 2>&1 || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get update failed"; }
        apt-get install -y -q redis-server >>"$WORK/apt.log" 2>&1 \
            || { tail -n 20 "$WORK/apt.log" >&2; die "apt-get install redis-server failed"; }
    fi
    if [[ -n $POLICY_RC ]]; then
        rm -f "$POLICY_RC"
        POLICY_RC=""
    fi
}

have_tools || { install_redis; have_tools || die "redis-server, redis-cli or redis-benchmark still not found after installing"; }
REDIS_VERSION="$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
BENCH_VERSION="$(redis-benchmark --version 2>/dev/null | head -n 1 || true)"
log "Redis binaries: $(command -v redis-server) ($REDIS_VERSION)"

# --- A temporary server ------------------------------------------------------------

PORT="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')"
mkdir -p "$WORK/data" "$WORK/logs"
cat >"$WORK/redis.conf" <<EOF
bind 127.0.0.1
port $PORT
protected-mode yes
daemonize no
dir $WORK/data
logfile $WORK/redis.log
databases 1
# durability: every write is in the AOF and fsynced before its reply is sent
appendonly yes
appendfsync always
no-appendfsync-on-rewrite no
# no RDB snapshots
save ""
EOF
redis-server "$WORK/redis.conf" &
REDIS_PID=$!

rc() { redis-cli -h 127.0.0.1 -p "$PORT" "$@"; }

for _ in $(seq 1 100); do
    [[ $(rc ping 2>/dev/null) == PONG ]] && break
    kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited at start"
    sleep 0.1
done
[[ $(rc ping 2>/dev/null) == PONG ]] || die "redis-server did not answer within 10 s"
log "server started on 127.0.0.1:$PORT (pid $REDIS_PID), data in $WORK/data"

config() { rc config get "$1" | sed -n 2p; }
APPENDONLY="$(config appendonly)"
APPENDFSYNC="$(config appendfsync)"
SAVE="$(config save)"
[[ $APPENDONLY == yes && $APPENDFSYNC == always && -z $SAVE ]] \
    || die "the server runs with appendonly=$APPENDONLY appendfsync=$APPENDFSYNC save='$SAVE', not as configured"

# --- The script, the wallets and a functional check --------------------------------

SHA="$(rc -x script load <"$HERE/wallet.lua")"
[[ $SHA =~ ^[0-9a-f]{40}$ ]] || die "SCRIPT LOAD of wallet.lua failed: $SHA"

# Wallets w:000000000000 .. w:<WALLETS-1>, twelve digits: the form that
# redis-benchmark gives __rand_int__.
log "preparing $WALLETS wallets of $SEED_BALANCE minor units each"
PREPARED="$(rc eval "for i = 0, tonumber(ARGV[1]) - 1 do
        redis.call('SET', string.format('w:%012d', i), ARGV[2])
    end
    return redis.call('DBSIZE')" 0 "$WALLETS" "$SEED_BALANCE")"
[[ $PREPARED == "$WALLETS" ]] || die "expected $WALLETS keys after preparing the wallets, found $PREPARED"

debit() { rc evalsha "$SHA" 2 "$@" | sed '/^$/d'; }
expect() {  # expect WHAT GOT WANTED
    [[ $2 == "$3" ]] || die "self-test: $1: got '$2', expected '$3'"
}
selftest() {
    local k=selftest
    rc set "$k:w" 5000 >/dev/null
    expect "first debit" "$(debit "$k:e1" "$k:w" 3000)" ok
    expect "balance after it" "$(rc get "$k:w")" 2000
    expect "repeat of the same event" "$(debit "$k:e1" "$k:w" 3000)" ok
    expect "balance after the repeat" "$(rc get "$k:w")" 2000
    expect "debit above the balance" "$(debit "$k:e2" "$k:w" 3000)" insufficient
    expect "balance after the refusal" "$(rc get "$k:w")" 2000
    rc set "$k:w" 10000 >/dev/null
    expect "repeat of the refused event after a top-up" "$(debit "$k:e2" "$k:w" 3000)" insufficient
    expect "balance after that repeat" "$(rc get "$k:w")" 10000
    expect "debit of the whole balance" "$(debit "$k:e3" "$k:w" 10000)" ok
    expect "balance after it" "$(rc get "$k:w")" 0
    expect "debit of a missing wallet" "$(debit "$k:e4" "$k:missing" 1)" insufficient
    expect "missing wallet not created" "$(rc exists "$k:missing")" 0
    local bad
    for bad in 0 -5 1.5 abc; do
        expect "amount $bad refused" "$(debit "$k:e5" "$k:w" "$bad" | cut -c1-3)" ERR
    done
    expect "refused amount leaves no event" "$(rc exists "$k:e5")" 0
    local ttl
    ttl="$(rc ttl "$k:e1")"
    [[ $ttl -gt $((TTL - 60)) && $ttl -le $TTL ]] || die "self-test: event TTL is $ttl, expected about $TTL"
    rc del "$k:w" "$k:e1" "$k:e2" "$k:e3" "$k:e4" >/dev/null
    expect "keys after the self-test" "$(rc dbsize)" "$WALLETS"
}
selftest
log "self-test passed (ok / repeat / insufficient, remembered / missing wallet / refused amounts / TTL)"

# --- Cases -----------------------------------------------------------------------------

# Sum over all wallets of (seed - balance): what was debited, exactly (each term
# is small, so the sum stays an exact integer in Lua's doubles), and how many
# balances are negative or missing.
WALLET_SCAN="local debited, negative, missing = 0, 0, 0
for i = 0, tonumber(ARGV[1]) - 1 do
    local v = redis.call('GET', string.format('w:%012d', i))
    if v == false then missing = missing + 1 else
        v = tonumber(v)
        if v < 0 then negative = negative + 1 end
        debited = debited + (tonumber(ARGV[2]) - v)
    end
end
return {string.format('%.0f', debited), negative, missing}"
wallet_scan() { rc eval "$WALLET_SCAN" 0 "$WALLETS" "$SEED_BALANCE" | tr '\n' ' '; }
events() { echo $(( $(rc dbsize) - WALLETS )); }

# Same starting point for every case: an AOF rewrite now (it compacts the
# previous cases' writes into a new base file) rather than an automatic one in
# the middle of a run.
compact_aof() {
    rc bgrewriteaof >/dev/null
    local i info
    for i in $(seq 1 600); do
        info="$(rc info persistence)"
        [[ $info =~ aof_rewrite_(in_progress|scheduled):1 ]] || return 0
        sleep 0.1
    done
    log "warning: the AOF rewrite did not finish within 60 s"
}

# The event key has as many 12-digit __rand_int__ fields (each 0..WALLETS-1,
# since -r is shared with the wallet key) as it takes to make at least 10^12
# possible ids: a run of a million debits then repeats an id with a chance of
# well under 1 in 1000.
FIELDS=1; SPACE=$WALLETS
while [[ $SPACE -lt 1000000000000 ]]; do FIELDS=$((FIELDS + 1)); SPACE=$((SPACE * WALLETS)); done
event_key() {  # event_key PREFIX
    local k="ev:$1" i
    for ((i = 0; i < FIELDS; i++)); do k+=":__rand_int__"; done
    echo "$k"
}

# bench_cmd CLIENTS PIPELINE REQUESTS EVENT_PREFIX [redis-benchmark options...]:
# sets BENCH to the redis-benchmark command line of one run.
bench_cmd() {
    local clients=$1 pipeline=$2 requests=$3 prefix=$4; shift 4
    BENCH=(redis-benchmark -h 127.0.0.1 -p "$PORT" -c "$clients" -P "$pipeline" -n "$requests" -r "$WALLETS")
    [[ -z $THREADS ]] || BENCH+=(--threads "$THREADS")
    BENCH+=("$@" evalsha "$SHA" 2 "$(event_key "$prefix")" 'w:__rand_int__' "$AMOUNT")
}

: >"$WORK/cases.jsonl"
FAILED_RUNS=0

# run_case NAME CLIENTS PIPELINE
run_case() {
    local name=$1 clients=$2 pipeline=$3
    compact_aof

    # Warm-up: the same clients, for WARMUP seconds (redis-benchmark has no
    # duration option, so it is stopped by timeout); its rate sizes the measured
    # run. Its events are counted from the database.
    local e0 e1 e2 rate requests rc_=0
    e0="$(events)"
    bench_cmd "$clients" "$pipeline" 1000000000 "$name-warmup" -q
    timeout -s TERM "$WARMUP" "${BENCH[@]}" >"$WORK/logs/$name.warmup.out" 2>&1 || true
    sleep 0.2
    e1="$(events)"
    rate=$(( (e1 - e0) / WARMUP ))
    [[ $rate -gt 0 ]] || die "$name: no debit completed in the ${WARMUP} s warm-up (see the output: $(tail -c 300 "$WORK/logs/$name.warmup.out"))"
    # A whole number of pipelined batches, so that redis-benchmark sends exactly
    # this many requests.
    requests=$(( (rate * DURATION + pipeline - 1) / pipeline * pipeline ))
    [[ $requests -ge $((clients * pipeline)) ]] || requests=$((clients * pipeline))

    # The measured run. If it took less than 3/4 of the target (the warm-up's
    # rate is a rough guide: the first second of a run is often slower), it is
    # repeated once, sized from its own rate, and counts as warm-up.
    local before after attempt t0 t1 elapsed_ms
    for attempt in 1 2; do
        before="$(wallet_scan)"
        bench_cmd "$clients" "$pipeline" "$requests" "$name-$attempt" --csv --precision 3
        t0=$(date +%s%N)
        rc_=0
        "${BENCH[@]}" >"$WORK/logs/$name.out" 2>"$WORK/logs/$name.err" || rc_=$?
        t1=$(date +%s%N)
        e2="$(events)"
        after="$(wallet_scan)"
        elapsed_ms=$(( (t1 - t0) / 1000000 + 1 ))
        if [[ $attempt -eq 1 && $rc_ -eq 0 && $((e2 - e1)) -eq $requests && $elapsed_ms -lt $((DURATION * 750)) ]]; then
            log "  $name: $requests requests took only ${elapsed_ms} ms; once more, sized from that rate"
            cp "$WORK/logs/$name.out" "$WORK/logs/$name.short.out"
            requests=$(( (requests * DURATION * 1000 / elapsed_ms + pipeline - 1) / pipeline * pipeline ))
            e1=$e2
            continue
        fi
        break
    done
    if [[ $rc_ -ne 0 ]]; then
        FAILED_RUNS=$((FAILED_RUNS + 1))
        log "warning: redis-benchmark exited $rc_ for $name:"
        tail -n 15 "$WORK/logs/$name.err" >&2
    fi

    local deb0 deb1 neg1 miss1 _
    read -r deb0 _ _ <<<"$before"
    read -r deb1 neg1 miss1 <<<"$after"
    python3 "$HERE/summarize.py" case --name "$name" --clients "$clients" --pipeline "$pipeline" \
        --seconds "$DURATION" --warmup "$WARMUP" --requests "$requests" --csv "$WORK/logs/$name.out" \
        --stderr "$WORK/logs/$name.err" --exit-code "$rc_" --warmup-events $((e1 - e0)) \
        --events-added $((e2 - e1)) --debited $((deb1 - deb0)) --amount "$AMOUNT" \
        --negative "$neg1" --missing "$miss1" >>"$WORK/cases.jsonl"
    python3 -c 'import json,sys
c = json.loads(sys.stdin.read().splitlines()[-1])
l = c["latency_us"]
ms = lambda v: "-" if v is None else "%.2f ms" % (v / 1000)
print("[redis-baseline]   %-16s %8s debits/s  p50 %s  p99 %s  errors %d  (check: %d requests, %d new event keys, %d debited = %d x %d)" % (
      c["name"], "-" if c["achieved_rate"] is None else format(round(c["achieved_rate"]), ","),
      ms(l["p50"]), ms(l["p99"]), c["errors"], c["requests"], c["events_added"],
      c["debited"], c["amount"], c["debited"] // c["amount"] if c["amount"] else 0))' <"$WORK/cases.jsonl" >&2
}

TOTAL_CASES=4
log "running $TOTAL_CASES cases: ${WARMUP} s warm-up run + about ${DURATION} s measured run each; event keys of $FIELDS x 12 digits"
run_case "uniform_c1"      1  1
run_case "uniform_c8"      8  1
run_case "uniform_c64"     64 1
run_case "uniform_c64_p16" 64 16

# --- Consistency after all runs --------------------------------------------------------

read -r DEBITED NEGATIVE MISSING <<<"$(wallet_scan)"
EVENTS="$(events)"
CONSERVED=false
[[ $DEBITED -eq $((EVENTS * AMOUNT)) ]] && CONSERVED=true
AOF_FSYNC_DELAYED="$(rc info persistence | sed -n 's/^aof_delayed_fsync:\([0-9]*\).*/\1/p')"
[[ -n $AOF_FSYNC_DELAYED ]] || AOF_FSYNC_DELAYED=null

python3 - "$WORK/meta.json" <<EOF
import json, os, sys, time
meta = {
    "benchmark": "tally Redis baseline: strict idempotent debits in one Lua script (EVALSHA)",
    "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "seconds": $DURATION,
    "warmup_seconds": $WARMUP,
    "cpus": os.cpu_count(),
    "wallets": $WALLETS,
    "amount_minor_units": $AMOUNT,
    "seed_balance_minor_units": $SEED_BALANCE,
    "event_key_fields": $FIELDS,
    "event_ttl_seconds": $TTL,
    "server": {
        "source": "temporary",
        "version": "$REDIS_VERSION",
        "appendonly": "$APPENDONLY",
        "appendfsync": "$APPENDFSYNC",
        "save": "$SAVE",
        "connection": "tcp 127.0.0.1",
    },
    "redis_benchmark": "$BENCH_VERSION",
    "redis_benchmark_threads": int("${THREADS:-1}"),
    "script_sha1": "$SHA",
    "checks": {
        "money_conserved": "$CONSERVED" == "true",
        "event_keys": int("$EVENTS"),
        "debited_minor_units": int("$DEBITED"),
        "negative_balances": int("$NEGATIVE"),
        "missing_wallets": int("$MISSING"),
        "aof_delayed_fsync": $AOF_FSYNC_DELAYED,
        "redis_benchmark_runs_failed": $FAILED_RUNS,
    },
}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f)
EOF

python3 "$HERE/summarize.py" report --cases "$WORK/cases.jsonl" --meta "$WORK/meta.json" --json "$JSON_OUT"
log "done in $(( $(date +%s) - START_TS )) s"

[[ $CONSERVED == true && $NEGATIVE -eq 0 && $MISSING -eq 0 ]] \
    || die "consistency check failed: $EVENTS event keys, debited $DEBITED (expected $((EVENTS * AMOUNT))), negative balances $NEGATIVE, missing wallets $MISSING"
[[ $FAILED_RUNS -eq 0 ]] || die "$FAILED_RUNS redis-benchmark run(s) failed"
python3 -c 'import json,sys
bad = [c["name"] for c in json.load(open(sys.argv[1]))["cases"] if c["errors"]]
sys.exit("[redis-baseline] error: cases with errors: " + ", ".join(bad) if bad else 0)' "$JSON_OUT"
