#!/bin/bash
# usage: evaluate.sh side ckpt outdir [which=val|train] [extra]
side=$1; ckpt=$2; out=$3; which=${4:-val}; shift 4
tree=/work/wt-exp; [ $side = old ] && tree=/work/wt-old
extra=()
export PYTHONPATH=$tree OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DELINEA_SPLIT_DIR=/work/exp/splits
mkdir -p $out.root; cd $out.root
/work/main/.venv/bin/python -m delinea test --ckpt $ckpt --data folder --data.root ${ROOT:-/work/exp/data/ct_pretrain} \
  --data.modality ct --data.split random --data.split_file /work/exp/data/eval_$which.json --data.resolution 128 \
  "${extra[@]}" --output $out --overwrite true --overlays 0 --trainer.logger false --trainer.enable_progress_bar false --trainer.default_root_dir $out.root "$@" > $out.log 2>&1
python3 -c "import json,sys; d=json.load(open('$out/metrics_summary.json')); print('$ckpt', round(d['mDSC'],4), {k: round(v['dice'],3) if v.get('dice') is not None else None for k,v in d['organs'].items()})"
