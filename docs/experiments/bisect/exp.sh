#!/bin/bash
# usage: exp.sh name seed [overrides...]  (main's code, bisect new.yaml as the base)
name=$1; seed=$2; shift 2
export PYTHONPATH=/work/wt-exp OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 DELINEA_SPLIT_DIR=/work/exp/splits
cd /work/exp/bisect
exec /work/main/.venv/bin/python -m delinea fit --config /work/exp/bisect/new.yaml --seed_everything $seed --data.seed $seed \
  --model.latent_cache /work/exp/bisect/cache_new --trainer.default_root_dir /work/exp/bisect/runs/${name}_s$seed "$@" > /work/exp/bisect/log_${name}_s$seed.txt 2>&1
