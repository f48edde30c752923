"""``make demo``: the paper's downstream protocol on the bundled real CT and MR, from the shipped pretrained models.

    python -m delinea.demo              # the protocol from the shipped models (about 10 minutes on 2 cores)
    python -m delinea.demo --smoke      # the same stages with 2-step fine-tuning (the test suite runs this)
    python -m delinea.demo --pretrain   # first pretrain again (python -m delinea.demo.pretrain, hours), then the same

The stages are :class:`~delinea.demo.downstream.Demo`'s; ``--pretrain`` runs :mod:`delinea.demo.pretrain` first.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from delinea.demo.downstream import Demo
from delinea.demo.pretrain import main as pretrain
from delinea.demo.protocol import WEIGHTS


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m delinea.demo", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default: demo/)")
    parser.add_argument("--smoke", action="store_true", help="2-step fine-tuning: every stage, in a minute or two")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain again first (python -m delinea.demo.pretrain; hours) and use those models",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # The stages call the delinea command in-process with their own arguments; that is intended here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    models = {kind: WEIGHTS / kind for kind in ("meddelinea", "unet")}
    if args.pretrain:
        record = pretrain(["--out", str(args.out / "pretrain")])
        models = {kind: Path(record["runs"][record[f"shipped_{kind}"]]["checkpoint"]) for kind in models}
    summary = Demo(args.out, args.smoke, models).run()
    print(json.dumps({name: round(test["mDSC"], 3) for name, test in summary["tests"].items()}, indent=2))
    return summary


if __name__ == "__main__":
    main()
