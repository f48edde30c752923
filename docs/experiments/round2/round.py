"""Issue 21, round 2: 40-minute pretrainings (the shipped protocol, delinea.demo.pretrain's own functions) side by
side, each with its own extra options: python round.py OUT name:seed:opt=val,opt=val ..."""
import json, sys
from pathlib import Path
from delinea.demo import pretrain as P
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
root, split_file = P.prepare_pretraining(out / "data")
P.preprocess_once(root, split_file, out / "logs")
jobs, extras = {}, {}
for spec in sys.argv[2:]:
    name, seed, opts = spec.split(":")
    extra = ["--data.augment", "false", "--data.centre_short", "true"]
    for kv in filter(None, opts.split(",")):
        k, v = kv.split("="); extra += [f"--{k}", v]
    extras[name] = extra
    jobs[name] = P.command("meddelinea", int(seed), 40.0, root, split_file, out / name, extra)
seconds = P.run_side_by_side(jobs, out / "logs")
record = {n: {"command": " ".join(c), "wall_seconds": seconds[n], **P.curves(out / n)} for n, c in jobs.items()}
(out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps({n: (r["steps"], r["best_val_mDSC"], r["best_step"]) for n, r in record.items()}))
