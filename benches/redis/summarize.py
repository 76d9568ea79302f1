#!/usr/bin/env python3
"""Summarize the Redis baseline runs of run.sh (standard library only).

Two subcommands, as benches/postgres/summarize.py:

  case    reads one measured redis-benchmark run (its --csv output) plus the
          counts run.sh took from the database around it, and prints one JSON
          object (one line) describing the case.
  report  reads the JSON lines of all cases and a metadata JSON, prints a
          table, and writes the final JSON document (the same shape as the
          PostgreSQL baseline's: metadata, "checks", "cases").

redis-benchmark --csv prints one line per command:

    "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
    "p95_latency_ms","p99_latency_ms","max_latency_ms"

rps is the requests over the run's whole time (first request sent to last
answer). The latency of a request is from when its client wrote it to when the
answer arrived; with a pipeline of P, all P answers of a batch get the time
until the client's first read of them (redis-benchmark's measure), so it is the
batch's round trip. redis-benchmark does not count error replies.
redis-benchmark gives no p90 and p99.9: they are null, and p95 is there instead.

Errors, as for PostgreSQL, come from the database: every call of the script
with a new event id leaves exactly one event key, and every 'ok' takes exactly
the amount from one wallet, so
  requests not answered   = requests - new event keys
  not 'ok' (insufficient) = new event keys - debited / amount
(an error reply, e.g. NOSCRIPT, leaves no key and so counts in the first).
"""

import argparse
import csv
import json
import sys


def ms_to_us(v):
    try:
        return round(float(v) * 1000)
    except (TypeError, ValueError):
        return None


def read_csv(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        rows = [r for r in csv.reader(f) if r]
    header = None
    for r in rows:
        if r[0] == "test":
            header = r
        elif header and len(r) == len(header):
            return dict(zip(header, r))
    return None


def cmd_case(args):
    row = read_csv(args.csv)
    with open(args.stderr, encoding="utf-8", errors="replace") as f:
        err_text = f.read()
    error_lines = sum(1 for line in err_text.splitlines() if "error" in line.lower())

    rps = float(row["rps"]) if row and row.get("rps") else None
    unanswered = max(0, args.requests - args.events_added)
    extra_events = max(0, args.events_added - args.requests)
    ok_debits = args.debited // args.amount if args.amount else 0
    not_ok = max(0, args.events_added - ok_debits)
    errors = unanswered + not_ok + extra_events + (1 if args.debited % args.amount else 0)
    if row is None or args.exit_code != 0:
        errors = max(errors, 1)

    case = {
        "name": args.name,
        "clients": args.clients,
        "pipeline": args.pipeline,
        "in_flight": args.clients * args.pipeline,
        "mix": "uniform",
        "offered_rate": None,
        "achieved_rate": None if rps is None else round(rps, 1),
        "errors": errors,
        "latency_us": {
            "p50": ms_to_us(row and row.get("p50_latency_ms")),
            "p90": None,
            "p95": ms_to_us(row and row.get("p95_latency_ms")),
            "p99": ms_to_us(row and row.get("p99_latency_ms")),
            "p999": None,
            "max": ms_to_us(row and row.get("max_latency_ms")),
            "avg": ms_to_us(row and row.get("avg_latency_ms")),
            "min": ms_to_us(row and row.get("min_latency_ms")),
        },
        # Raw material behind the figures above.
        "seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "requests": args.requests,
        "measured_window_s": round(args.requests / rps, 3) if rps else None,
        "warmup_events": args.warmup_events,
        "events_added": args.events_added,
        "debited": args.debited,
        "amount": args.amount,
        "ok_debits": ok_debits,
        "unanswered": unanswered,
        "not_ok_results": not_ok,
        "extra_events": extra_events,
        "negative_balances": args.negative,
        "missing_wallets": args.missing,
        "redis_benchmark_exit_code": args.exit_code,
        "redis_benchmark_error_lines": error_lines,
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

    headers = ["case", "clients", "pipeline", "requests", "debits/s", "errors",
               "p50 ms", "p95 ms", "p99 ms", "max ms"]
    rows = []
    for c in cases:
        lat = c["latency_us"]
        rows.append([
            c["name"], str(c["clients"]), str(c["pipeline"]), fmt_int(c["requests"]),
            "-" if c["achieved_rate"] is None else f"{c['achieved_rate']:,.0f}",
            fmt_int(c["errors"]),
            fmt_ms(lat["p50"]), fmt_ms(lat["p95"]), fmt_ms(lat["p99"]), fmt_ms(lat["max"]),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            cell.ljust(w) if i < 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths)))

    print()
    srv = meta.get("server", {})
    print(f"Redis {srv.get('version', '?')} ({srv.get('source', '?')}), "
          f"appendonly={srv.get('appendonly', '?')}, appendfsync={srv.get('appendfsync', '?')}, "
          f"save='{srv.get('save', '?')}', about {meta.get('seconds', '?')} s per case after "
          f"a {meta.get('warmup_seconds', '?')} s warm-up run")
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    checks = meta.get("checks", {})
    if checks:
        print("checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))

    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"JSON written to {args.json}")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("case", help="summarize one redis-benchmark run as a JSON line")
    c.add_argument("--name", required=True)
    c.add_argument("--clients", type=int, required=True)
    c.add_argument("--pipeline", type=int, required=True)
    c.add_argument("--seconds", type=int, required=True, help="target measured seconds")
    c.add_argument("--warmup", type=int, required=True, help="seconds of the warm-up run")
    c.add_argument("--requests", type=int, required=True, help="requests of the measured run")
    c.add_argument("--csv", required=True, help="redis-benchmark --csv output")
    c.add_argument("--stderr", required=True, help="redis-benchmark's standard error")
    c.add_argument("--exit-code", type=int, default=0)
    c.add_argument("--warmup-events", type=int, required=True)
    c.add_argument("--events-added", type=int, required=True,
                   help="new event keys during the measured run")
    c.add_argument("--debited", type=int, required=True,
                   help="minor units taken from the wallets during the measured run")
    c.add_argument("--amount", type=int, required=True, help="minor units per debit")
    c.add_argument("--negative", type=int, default=0)
    c.add_argument("--missing", type=int, default=0)
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
