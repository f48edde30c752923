#!/bin/bash
run() { s=$1; sc=$2; st=$3; ck=/work/exp/ship/meddelinea_seed$s/lightning_logs/version_0/checkpoints/last.ckpt
  DELINEA_NOISE_SCALE=$sc RUNNER=/work/exp/r2/zero_start.py ./evaluate.sh $ck /work/exp/r2/eval/s${s}_last_noise${sc}_steps${st} val --model.sampling_steps $st; }
for cfg in "0 5" "0.5 5" "0 20"; do run 0 $cfg & run 1 $cfg; wait; done
