"""Print the most recent run in benchmarks/results.csv for each (machine, device).

    python benchmarks/latest.py [path/to/results.csv]
"""
import csv
import os
import sys


def main(path: str) -> int:
    if not os.path.exists(path):
        print(f"{path}: no results yet (run `python -m pyllm bench`)")
        return 1
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    latest = {}
    for r in rows:
        key = (r["machine"], r["device"])
        if key not in latest or r["date"] > latest[key]:
            latest[key] = r["date"]
    for (machine, device), date in sorted(latest.items()):
        print(f"== {machine} ({device}), {date}")
        for r in rows:
            if (r["machine"], r["device"], r["date"]) != (machine, device, date):
                continue
            met = {"1": "met", "0": "NOT met"}.get(r["met"], "")
            print(f"  {r['op']:15s} {r['dtype']:9s} {r['pyllm_us']:>11s} us  vs {r['baseline']:34s}"
                  f"{r['baseline_us']:>11s} us  {float(r['speedup']):5.2f}x  {r['pct_copy_bw']:>5s}% BW  {met}")
    return 0


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "results.csv")))
