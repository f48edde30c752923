"""The task's own validation mDSC (over the organs present in the validation slabs) at equal steps, from each
run's CSV log in curves/: the mean of the evaluations in each 500-step bin, and the best."""
import csv, statistics, sys
from pathlib import Path
bins = range(0, 5000, 500)
print("| run | steps | " + " | ".join(f"{b}-{b + 499}" for b in bins) + " | best (step) |")
print("|---|---|" + "---|" * len(bins) + "---|")
for f in sorted(Path(__file__).parent.glob("curves/*.csv")):
    rows = list(csv.DictReader(open(f)))
    val = [(int(r["step"]), float(r["val/mDSC"])) for r in rows if r.get("val/mDSC")]
    steps = max(int(r["step"]) for r in rows)
    cells = []
    for b in bins:
        v = [x for s, x in val if b <= s < b + 500]
        cells.append(f"{statistics.mean(v):.2f}" if v else "")
    best = max(val, key=lambda x: x[1])
    print(f"| {f.stem} | {steps} | " + " | ".join(cells) + f" | {best[1]:.3f} ({best[0]}) |")
