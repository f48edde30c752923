"""Pretrain the demo's MedDelinea (both seeds side by side, one thread each) with the settings chosen in the
bisect/lever experiments; the UNet stays as shipped. Uses delinea.demo.pretrain's own functions."""
import json, sys
from pathlib import Path
from delinea.demo import pretrain as P
out = Path(sys.argv[1]); minutes = float(sys.argv[2]); extra = sys.argv[3:]
out.mkdir(parents=True, exist_ok=True)
root, split_file = P.prepare_pretraining(out / "data")
record = {"protocol": (P.__doc__ or "").split("\n\n", 2)[2].strip(), "split": json.loads(split_file.read_text()),
          "minutes": minutes, "seeds": [0, 1], "runs": {}, "extra": extra}
record["preprocess"] = P.preprocess_once(root, split_file, out / "logs")
jobs = {f"meddelinea_seed{s}": P.command("meddelinea", s, minutes, root, split_file, out / f"meddelinea_seed{s}",
        ["--data.augment", "false", "--data.centre_short", "true", *extra]) for s in (0, 1)}
seconds = P.run_side_by_side(jobs, out / "logs")
for name, cmd in jobs.items():
    record["runs"][name] = {"command": " ".join(cmd), "wall_seconds": seconds[name], **P.curves(out / name)}
(out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps({n: (r["steps"], r["best_val_mDSC"], r["best_step"]) for n, r in record["runs"].items()}))
