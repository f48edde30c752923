#!/bin/bash
# usage: evaluate.sh ckpt outdir which(val|train) [extra delinea test options]
ckpt=$1; out=$2; which=$3; shift 3
export PYTHONPATH=/work/main OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} DELINEA_SPLIT_DIR=/work/exp/splits
mkdir -p $out.root; cd $out.root
/work/main/.venv/bin/python ${RUNNER:--m delinea} test --ckpt $ckpt --data folder --data.root /work/exp/data/ct_pretrain \
  --data.modality ct --data.split random --data.split_file /work/exp/data/eval_$which.json --data.resolution 128 \
  --output $out --overwrite true --overlays 0 --trainer.logger false --trainer.enable_progress_bar false --trainer.default_root_dir $out.root "$@" > $out.log 2>&1
python3 -c "import json,sys; d=json.load(open('$out/metrics_summary.json')); o=d['organs']; six=['aorta','kidney_left','kidney_right','liver','spleen','stomach']; print('$out', 'six', round(sum(o[k]['dice'] for k in six)/6,4), {k: round(v['dice'],3) if v.get('dice') is not None else None for k,v in o.items()})"
