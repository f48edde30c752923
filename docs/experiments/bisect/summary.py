import json, sys, collections
organs6 = ["aorta", "kidney_left", "kidney_right", "liver", "spleen", "stomach"]
f = sys.argv[1] if len(sys.argv) > 1 else "/work/exp/bisect/evals.jsonl"
which = sys.argv[2] if len(sys.argv) > 2 else "val"
rows = [json.loads(l) for l in open(f)]
table = collections.defaultdict(dict)
for r in rows:
    if r["which"] != which or "error" in r["organs"]: continue
    vals = [r["organs"].get(o) or 0.0 for o in organs6]
    table[r["run"]][r["step"]] = sum(vals) / len(vals)
steps = sorted({s for t in table.values() for s in t})
print("run      " + " ".join(f"{s:>6}" for s in steps))
for run in sorted(table):
    print(f"{run:8} " + " ".join(f"{table[run].get(s, float('nan')):6.3f}" for s in steps))
