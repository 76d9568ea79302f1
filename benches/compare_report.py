#!/usr/bin/env python3
"""Prints tally against the PostgreSQL and Redis baselines from the JSON files `benches/compare` wrote.

Usage: compare_report.py OUT_DIR RATE. Reads OUT_DIR/tally-<case>.json (tally-loadtest
reports), OUT_DIR/postgres.json (benches/postgres/run.sh) and, if present, OUT_DIR/redis.json
(benches/redis/run.sh), prints a table with ratios and then the ratios issue 15 sets targets
for, and writes OUT_DIR/compare.json. Rates are durable debits per second (achieved,
successful only).
"""
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


# The ratios issue 15 names: (label, tally case, baseline, baseline case, target).
TARGETS = [
    ("64 separate connections vs Redis 64 clients, pipeline 1",
     "uniform_c64", "redis", "uniform_c64", 1.5),
    ("1 client x 64 callers vs Redis 64 clients, pipeline 1",
     "shared_c1x64", "redis", "uniform_c64", 4.0),
    ("1 client x 64 callers vs PostgreSQL 64 clients",
     "shared_c1x64", "postgres", "uniform_c64", 15.0),
    ("1 client x 1,024 callers vs Redis 64 clients, pipeline 16",
     "shared_c1x1024", "redis", "uniform_c64_p16", 2.0),
]


def main():
    out, rate = sys.argv[1], sys.argv[2]
    pg = {c["name"]: c for c in load(os.path.join(out, "postgres.json"))["cases"]}
    redis_path = os.path.join(out, "redis.json")
    redis = ({c["name"]: c for c in load(redis_path)["cases"]}
             if os.path.exists(redis_path) else {})
    tally = {}
    for name in os.listdir(out):
        if name.startswith("tally-") and name.endswith(".json") and name != "tally-sweep.json":
            tally[name[len("tally-"):-len(".json")]] = load(os.path.join(out, name))

    def debits(report):
        return report.get("debits_per_sec", report.get("achieved_rate", 0.0))

    def ratio(a, b):
        return a / b if b else float("inf")

    def lat(report):
        if report is None:
            return "-"
        l = report["latency_us"]
        return f"{l['p50'] if l['p50'] is not None else '-'}/{l['p99'] if l['p99'] is not None else '-'}"

    open_case = f"open_uniform_c64_r{rate}"
    best_pg = max(pg.values(), key=lambda c: c["achieved_rate"])
    # (label, tally case, postgres case, redis case); None: no such baseline case.
    rows = [
        ("unbatched, 1 connection", "uniform_c1", "uniform_c1", "uniform_c1"),
        ("unbatched, 8 connections", "uniform_c8", "uniform_c8", "uniform_c8"),
        ("unbatched, 64 connections", "uniform_c64", "uniform_c64", "uniform_c64"),
        ("1 connection x 64 callers", "shared_c1x64", "uniform_c64", "uniform_c64"),
        ("1 connection x 1,024 callers", "shared_c1x1024", "uniform_c64", "uniform_c64_p16"),
        ("hot set (90 % on 10 wallets), 64 conn.", "hot_c64", "hot_c64", None),
        (f"open loop {rate}/s, 64 connections", open_case, open_case, None),
        ("batched (512 events/frame), 8 conn.", "batched_c8", best_pg["name"], None),
    ]
    table = []
    print()
    print(f"{'case':<40} {'tally/s':>8} {'postgres/s':>10} {'x pg':>6} {'redis/s':>8} {'x redis':>7}"
          f"   {'p50/p99 us: tally':>18} {'postgres':>12} {'redis':>12}")
    notes = []
    for label, t_name, p_name, r_name in rows:
        t, p = tally.get(t_name), pg.get(p_name)
        r = redis.get(r_name) if r_name else None
        if t is None:
            print(f"{label:<40} {'(missing)':>8}")
            continue
        t_rate = debits(t)
        p_rate = p["achieved_rate"] if p else None
        r_rate = r["achieved_rate"] if r else None
        p_ratio = ratio(t_rate, p_rate) if p_rate is not None else None
        r_ratio = ratio(t_rate, r_rate) if r_rate is not None else None
        fmt_rate = lambda v: "-" if v is None else f"{v:.0f}"
        fmt_ratio = lambda v: "-" if v is None else f"{v:.1f}x"
        print(f"{label:<40} {t_rate:>8.0f} {fmt_rate(p_rate):>10} {fmt_ratio(p_ratio):>6} "
              f"{fmt_rate(r_rate):>8} {fmt_ratio(r_ratio):>7}   "
              f"{lat(t):>18} {lat(p):>12} {lat(r):>12}")
        if p is not None and p_name != t_name:
            notes.append(f"{label}: postgres column is its {p_name}"
                         + (" (its best)" if p_name == best_pg["name"] and t_name == "batched_c8" else ""))
        if r is not None and r_name != t_name:
            notes.append(f"{label}: redis column is its {r_name} "
                         f"({r['clients']} clients x pipeline {r['pipeline']} = {r['in_flight']} in flight)")
        t_errors = sum(t.get("errors", {}).values())
        table.append({
            "case": t_name, "label": label, "tally_debits_per_sec": t_rate,
            "postgres_case": p_name if p else None, "postgres_debits_per_sec": p_rate,
            "ratio": p_ratio,
            "redis_case": r_name if r else None, "redis_debits_per_sec": r_rate,
            "redis_ratio": r_ratio,
            "tally_latency_us": t["latency_us"],
            "postgres_latency_us": p["latency_us"] if p else None,
            "redis_latency_us": r["latency_us"] if r else None,
            "tally_errors": t_errors,
            "postgres_errors": p.get("errors", 0) if p else None,
            "redis_errors": r.get("errors", 0) if r else None,
        })
    for n in notes:
        print(f"  note: {n}")
    if "uniform_c64" in tally and "hot_c64" in tally:
        u, h = debits(tally["uniform_c64"]), debits(tally["hot_c64"])
        print(f"\ntally hot set / uniform at 64 connections: {h / u:.2f}x "
              f"(postgres: {pg['hot_c64']['achieved_rate'] / pg['uniform_c64']['achieved_rate']:.2f}x)")

    targets = []
    print("\nissue 15 targets:")
    for label, t_name, base, b_name, target in TARGETS:
        t = tally.get(t_name)
        b = (redis if base == "redis" else pg).get(b_name)
        if t is None or b is None:
            why = f"no tally {t_name}" if t is None else f"no {base} {b_name}"
            print(f"  {label:<58} {'-':>7}  target >= {target:g}x  ({why})")
            targets.append({"label": label, "tally_case": t_name, "baseline": base,
                            "baseline_case": b_name, "target": target, "ratio": None, "met": None})
            continue
        value = ratio(debits(t), b["achieved_rate"])
        met = value >= target
        print(f"  {label:<58} {value:>6.2f}x  target >= {target:g}x  {'met' if met else 'missed'}"
              f"  ({debits(t):,.0f} vs {b['achieved_rate']:,.0f}/s)")
        targets.append({"label": label, "tally_case": t_name, "baseline": base,
                        "baseline_case": b_name, "target": target, "ratio": value, "met": met,
                        "tally_debits_per_sec": debits(t),
                        "baseline_debits_per_sec": b["achieved_rate"]})

    errors = {k: v.get("errors", {}) for k, v in tally.items() if v.get("errors")}
    errors = {k: v for k, v in errors.items() if any(v.values())}
    if errors:
        print(f"tally errors: {errors}")
    redis_errors = {k: v["errors"] for k, v in redis.items() if v.get("errors")}
    if redis_errors:
        print(f"redis errors: {redis_errors}")
    if not redis:
        print("(no redis.json: the Redis baseline was not run)")
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"rate": float(rate), "rows": table, "targets": targets}, f, indent=2)
    print(f"\nwritten: {os.path.join(out, 'compare.json')}, "
          f"{os.path.join(out, 'latency-throughput.svg')}")


if __name__ == "__main__":
    main()
