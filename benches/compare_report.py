#!/usr/bin/env python3
"""Prints tally against the PostgreSQL baseline from the JSON files `benches/compare` wrote.

Usage: compare_report.py OUT_DIR RATE. Reads OUT_DIR/tally-<case>.json (tally-loadtest
reports) and OUT_DIR/postgres.json (benches/postgres/run.sh), prints a table with ratios, and
writes OUT_DIR/compare.json. Rates are durable debits per second (achieved, successful only).
"""
import json
import os
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def main():
    out, rate = sys.argv[1], sys.argv[2]
    pg = {c["name"]: c for c in load(os.path.join(out, "postgres.json"))["cases"]}
    tally = {}
    for name in os.listdir(out):
        if name.startswith("tally-") and name.endswith(".json") and name != "tally-sweep.json":
            tally[name[len("tally-"):-len(".json")]] = load(os.path.join(out, name))

    def debits(report):
        return report.get("debits_per_sec", report.get("achieved_rate", 0.0))

    open_case = f"open_uniform_c64_r{rate}"
    best_pg = max(pg.values(), key=lambda c: c["achieved_rate"])
    rows = [
        ("unbatched, 1 connection", "uniform_c1", "uniform_c1"),
        ("unbatched, 8 connections", "uniform_c8", "uniform_c8"),
        ("unbatched, 64 connections", "uniform_c64", "uniform_c64"),
        ("hot set (90 % on 10 wallets), 64 conn.", "hot_c64", "hot_c64"),
        (f"open loop {rate}/s, 64 connections", open_case, open_case),
        ("batched (512 events/frame), 8 conn.", "batched_c8", best_pg["name"]),
    ]
    table = []
    print()
    print(f"{'case':<42} {'tally/s':>10} {'postgres/s':>11} {'ratio':>8}   "
          f"{'tally p50/p99 us':>18}   {'postgres p50/p99 us':>20}")
    for label, t_name, p_name in rows:
        t, p = tally.get(t_name), pg.get(p_name)
        if t is None or p is None:
            print(f"{label:<42} {'(missing)':>10}")
            continue
        t_rate, p_rate = debits(t), p["achieved_rate"]
        ratio = t_rate / p_rate if p_rate else float("inf")
        tl, pl = t["latency_us"], p["latency_us"]
        t_errors = sum(t.get("errors", {}).values())
        note = "" if p_name == t_name else f"  (vs postgres {p_name}, its best)"
        print(f"{label:<42} {t_rate:>10.0f} {p_rate:>11.0f} {ratio:>7.1f}x   "
              f"{tl['p50']:>8}/{tl['p99']:<9} {pl['p50']:>9}/{pl['p99']:<10}{note}")
        table.append({
            "case": t_name, "label": label, "tally_debits_per_sec": t_rate,
            "postgres_case": p_name, "postgres_debits_per_sec": p_rate, "ratio": ratio,
            "tally_latency_us": tl, "postgres_latency_us": pl, "tally_errors": t_errors,
            "postgres_errors": p.get("errors", 0),
        })
    if "uniform_c64" in tally and "hot_c64" in tally:
        u, h = debits(tally["uniform_c64"]), debits(tally["hot_c64"])
        print(f"\ntally hot set / uniform at 64 connections: {h / u:.2f}x "
              f"(postgres: {pg['hot_c64']['achieved_rate'] / pg['uniform_c64']['achieved_rate']:.2f}x)")
    errors = {k: v.get("errors", {}) for k, v in tally.items() if v.get("errors")}
    if errors:
        print(f"tally errors: {errors}")
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"rate": float(rate), "rows": table}, f, indent=2)
    print(f"\nwritten: {os.path.join(out, 'compare.json')}, "
          f"{os.path.join(out, 'latency-throughput.svg')}")


if __name__ == "__main__":
    main()
