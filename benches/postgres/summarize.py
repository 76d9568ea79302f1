#!/usr/bin/env python3
"""Summarize the PostgreSQL baseline runs of run.sh (standard library only).

Two subcommands:

  case    reads one pgbench run (its stdout and its per-transaction logs) plus
          the ledger/sequence deltas that run.sh measured around it, and
          prints one JSON object (one line) describing the case.
  report  reads the JSON lines of all cases and a metadata JSON, prints a
          table, and writes the final JSON document.

pgbench --log writes one line per transaction (one file per thread, named
PREFIX.PID and PREFIX.PID.N):

    client_id transaction_no time script_no time_epoch time_us [schedule_lag ...]

The 3rd column is the latency in microseconds, or "failed" / "skipped";
time_epoch.time_us is when the transaction finished. With --rate, pgbench
measures the latency from the transaction's *scheduled* start, so it includes
the schedule lag: when the server falls behind, the waiting shows up in the
figures instead of silently lowering the offered load (no coordinated
omission). That is the figure we want for the open-loop case.

Each case is ONE pgbench run of warm-up + measured + cool-down seconds, on
the same connections. The measured transactions are those that *started*
(for --rate: were scheduled) in the window from --warmup seconds after the
first transaction's start to --cooldown seconds before the last completion;
throughput is their count over the window's length, and the percentiles are
over their full latencies (selecting by start time does not favour fast
transactions at the edges). The cuts remove what a service with open
connections would not see:
  - at the start, connection set-up (with --rate, pgbench's schedule starts
    before all 64 connections are open, which alone puts a few hundred ms of
    lag on the first transactions), plpgsql compilation and statement
    preparation in each new session, cold caches;
  - at the end, the teardown: as clients stop, 64 backends exit at once and
    the last in-flight debits take 30-100 ms.
"""

import argparse
import glob
import json
import math
import re
import sys


def percentile(sorted_values, p):
    """Nearest-rank percentile (p in 0..100) of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def read_log(prefix):
    """All transactions of one run: (end_us, latency_us or None if failed or
    skipped, status) sorted by end time, and the files read."""
    # PREFIX.PID for the first thread, PREFIX.PID.N for the others.
    files = sorted(p for p in glob.glob(glob.escape(prefix) + ".*")
                   if re.fullmatch(r"\.\d+(\.\d+)?", p[len(prefix):]))
    txs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                cols = line.split()
                if len(cols) < 6:
                    continue
                end_us = int(cols[4]) * 1_000_000 + int(cols[5])
                if cols[2] in ("failed", "skipped"):
                    txs.append((end_us, None, cols[2]))
                else:
                    txs.append((end_us, int(cols[2]), "done"))
    txs.sort()
    return files, txs


def parse_pgbench_output(text):
    """The summary pgbench prints at the end of a run (PostgreSQL 12..17)."""

    def grab(pattern, conv=float):
        m = re.search(pattern, text, re.MULTILINE)
        return conv(m.group(1)) if m else None

    return {
        "processed": grab(r"^number of transactions actually processed: (\d+)", int),
        "failed": grab(r"^number of failed transactions: (\d+)", int),
        "tps": grab(r"^tps = ([0-9.]+)"),
        "schedule_lag_avg_ms": grab(r"^rate limit schedule lag: avg ([0-9.]+)"),
        # A client that hits an error other than a retryable one is aborted
        # ("client N aborted in command ..."); its transaction is counted
        # nowhere else.
        "aborted_clients": len(re.findall(r"client \d+ aborted", text)),
    }


def cmd_case(args):
    with open(args.pgbench_out, encoding="utf-8", errors="replace") as f:
        out = parse_pgbench_output(f.read())
    files, txs = read_log(args.log_prefix)
    if not files or not txs:
        sys.exit(f"summarize.py: no pgbench log lines in {args.log_prefix}.*")

    # The measured window, by (scheduled) start time: see the module doc.
    first_start = min(end - (lat or 0) for end, lat, _ in txs)
    w_from = first_start + args.warmup * 1_000_000
    w_to = txs[-1][0] - args.cooldown * 1_000_000
    window_s = (w_to - w_from) / 1e6
    if window_s <= 0:
        sys.exit(f"summarize.py: {args.name}: the run is shorter than warm-up + cool-down")
    lat = sorted(l for end, l, _ in txs if l is not None and w_from <= end - l < w_to)
    achieved = round(len(lat) / window_s, 1)

    # Errors over the whole run, warm-up included (run.sh counts the ledger
    # around the whole pgbench run). Every 'ok' leaves exactly one ledger row
    # and nothing else does, so the debits that returned something else
    # ('duplicate', 'insufficient') are the completed transactions that left
    # no row. A transaction in flight when pgbench's timer expired could
    # finish on the server uncounted by pgbench, making rows > transactions:
    # hence the clamp at zero (the raw counts are kept in the JSON).
    all_done = sum(1 for t in txs if t[1] is not None)
    processed = out["processed"] if out["processed"] is not None else all_done
    log_failed = sum(1 for t in txs if t[2] == "failed")
    log_skipped = sum(1 for t in txs if t[2] == "skipped")
    failed = max(out["failed"] or 0, log_failed)
    not_ok = max(0, processed - args.ledger_delta)
    errors = failed + log_skipped + not_ok + out["aborted_clients"]
    if args.exit_code != 0 and errors == 0:
        errors = 1  # pgbench failed in a way none of the counts above caught

    case = {
        "name": args.name,
        "clients": args.clients,
        "mix": args.mix,
        "offered_rate": args.rate if args.rate and args.rate > 0 else None,
        "achieved_rate": achieved,
        "errors": errors,
        "latency_us": {
            "p50": percentile(lat, 50),
            "p90": percentile(lat, 90),
            "p99": percentile(lat, 99),
            "p999": percentile(lat, 99.9),
            "max": lat[-1] if lat else None,
        },
        # Raw material behind the figures above.
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "cooldown_seconds": args.cooldown,
        "measured_window_s": round(window_s, 3),
        "measured_transactions": len(lat),
        "transactions_with_warmup": processed,
        "failed_transactions": failed,
        "skipped_transactions": log_skipped,
        "not_ok_results": not_ok,
        "ledger_rows_added": args.ledger_delta,
        "debit_calls_started": args.calls_delta,
        "pgbench_tps_with_warmup": out["tps"],
        "pgbench_schedule_lag_avg_ms": out["schedule_lag_avg_ms"],
        "pgbench_exit_code": args.exit_code,
        "pgbench_aborted_clients": out["aborted_clients"],
    }
    print(json.dumps(case))


def fmt_int(v):
    return "-" if v is None else f"{v:,}"


def fmt_ms(us):
    return "-" if us is None else f"{us / 1000.0:.2f}"


def cmd_report(args):
    with open(args.meta, encoding="utf-8") as f:
        meta = json.load(f)
    cases = []
    with open(args.cases, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                cases.append(json.loads(line))
    doc = dict(meta)
    doc["cases"] = cases

    headers = ["case", "clients", "mix", "offered/s", "achieved/s", "errors",
               "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
    rows = []
    for c in cases:
        lat = c["latency_us"]
        rows.append([
            c["name"], str(c["clients"]), c["mix"],
            "closed" if c["offered_rate"] is None else fmt_int(c["offered_rate"]),
            "-" if c["achieved_rate"] is None else f"{c['achieved_rate']:,.0f}",
            fmt_int(c["errors"]),
            fmt_ms(lat["p50"]), fmt_ms(lat["p90"]), fmt_ms(lat["p99"]),
            fmt_ms(lat["p999"]), fmt_ms(lat["max"]),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths)))

    print()
    srv = meta.get("server", {})
    print(f"PostgreSQL {srv.get('version', '?')} ({srv.get('source', '?')}), "
          f"fsync={srv.get('fsync', '?')}, synchronous_commit="
          f"{srv.get('synchronous_commit', '?')}, "
          f"{meta.get('seconds', '?')} s per case after "
          f"{meta.get('warmup_seconds', '?')} s warm-up")
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    checks = meta.get("checks", {})
    if checks:
        print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
    for c in cases:
        if c["offered_rate"] and c["achieved_rate"] is not None \
                and c["achieved_rate"] < 0.95 * c["offered_rate"]:
            print(f"note: {c['name']} did not keep up with the offered rate "
                  f"({c['achieved_rate']:,.0f}/s of {c['offered_rate']:,}/s); "
                  "its latencies include the growing backlog.")

    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"JSON written to {args.json}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("case", help="summarize one pgbench run as a JSON line")
    c.add_argument("--name", required=True)
    c.add_argument("--clients", type=int, required=True)
    c.add_argument("--mix", choices=["uniform", "hot"], required=True)
    c.add_argument("--rate", type=int, default=0, help="offered rate, 0 = closed loop")
    c.add_argument("--seconds", type=int, required=True, help="measured seconds")
    c.add_argument("--warmup", type=int, default=0,
                   help="seconds at the start of the log to leave out")
    c.add_argument("--cooldown", type=float, default=0,
                   help="seconds at the end of the log to leave out")
    c.add_argument("--log-prefix", required=True)
    c.add_argument("--pgbench-out", required=True)
    c.add_argument("--exit-code", type=int, default=0)
    c.add_argument("--ledger-delta", type=int, required=True)
    c.add_argument("--calls-delta", type=int, required=True)
    c.set_defaults(func=cmd_case)

    r = sub.add_parser("report", help="print the table and write the JSON document")
    r.add_argument("--cases", required=True)
    r.add_argument("--meta", required=True)
    r.add_argument("--json", required=True)
    r.set_defaults(func=cmd_report)

    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
