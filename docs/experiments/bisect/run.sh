#!/bin/bash
# usage: run.sh side seed [extra...]
side=$1; seed=$2; shift 2
tree=/work/wt-exp; [ $side = old ] && tree=/work/wt-old
cfg=$side.yaml; [ -f cfg_$side.yaml ] && cfg=cfg_$side.yaml
export PYTHONPATH=$tree OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 DELINEA_SPLIT_DIR=/work/exp/splits
cd $tree
exec /work/main/.venv/bin/python -m delinea fit --config /work/exp/bisect/${side%%_*}.yaml --seed_everything $seed --data.seed $seed \
  --model.latent_cache /work/exp/bisect/cache_${side%%_*} --trainer.default_root_dir /work/exp/bisect/runs/${side}_s$seed "$@"
