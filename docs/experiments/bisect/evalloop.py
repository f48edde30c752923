"""Evaluate every step checkpoint of the bisect runs on the validation slabs (each side with its own code)."""
import json, subprocess, time, sys
from pathlib import Path
root = Path("/work/exp/bisect")
done_file = root / "evals.jsonl"
done = {json.loads(l)["ckpt"] for l in done_file.read_text().splitlines()} if done_file.exists() else set()
runs = sys.argv[1].split(",") if len(sys.argv) > 1 else ["old_s0", "new_s0", "old_s1", "new_s1"]
which = sys.argv[2] if len(sys.argv) > 2 else "val"
final = int(sys.argv[3]) if len(sys.argv) > 3 else 400
while True:
    todo = []
    for run in runs:
        for ck in sorted((p for p in (root / "runs" / run).rglob("step=*.ckpt") if int(p.stem.split("=")[1]) % 100 == 0), key=lambda p: int(p.stem.split("=")[1])):
            if (str(ck), which) not in {(d, which) for d in done} and f"{ck}|{which}" not in done:
                todo.append((run, ck))
    if not todo:
        if all((root / "runs" / r).rglob(f"step={final}.ckpt") for r in runs) and all(
            any(f"step={final}.ckpt" in d for d in done if r in d) for r in runs):
            break
        time.sleep(30); continue
    run, ck = sorted(todo, key=lambda x: int(x[1].stem.split("=")[1]))[0]
    side = run.split("_")[0]
    out = root / "eval" / f"{run}_{ck.stem}_{which}"
    subprocess.run(["bash", str(root / "evaluate.sh"), side, str(ck), str(out), which], capture_output=True)
    try:
        s = json.loads((out / "metrics_summary.json").read_text())
        organs = {k: v.get("dice") for k, v in s["organs"].items()}
    except Exception as e:
        organs = {"error": str(e)}
        s = {"mDSC": None}
    rec = {"ckpt": f"{ck}|{which}", "run": run, "step": int(ck.stem.split("=")[1]), "which": which, "mDSC_reported": s.get("mDSC"), "organs": organs}
    with open(done_file, "a") as f: f.write(json.dumps(rec) + "\n")
    done.add(rec["ckpt"])
    print(rec, flush=True)
