#!/bin/bash
# Issue 21 round 2: the base DiT with patch 2 (DiT-mini/2, 256 tokens of 24 mm) trained by the demo's own recipe
# (configs/dit.yaml, 20 minutes, both CPU threads, the same CT training slabs as the shipped DiT-mini/4).
cd /work/exp/r2/dit2
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONPATH=/work/main /work/main/.venv/bin/delinea-pretrain fit \
  --config /work/main/delinea/demo/configs/dit.yaml --data.root /work/exp/ship/downstream_seed0/data/ct_train \
  --model.vae /work/main/delinea/demo/weights/vae --model.dit DiT-mini/2 --model.export_dir /work/exp/r2/dit2/export \
  --trainer.default_root_dir /work/exp/r2/dit2 --trainer.logger.init_args.save_dir /work/exp/r2/dit2 > dit2.log 2>&1
