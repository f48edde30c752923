#!/bin/bash
# sampler settings on the validation slabs, for the last checkpoints of the shipped pretraining (not chosen by val)
run() { s=$1; ens=$2; st=$3; ck=$(ls /work/exp/ship/meddelinea_seed$s/lightning_logs/version_0/checkpoints/last.ckpt 2>/dev/null || find /work/exp/ship/meddelinea_seed$s -name last.ckpt | head -1)
  ./evaluate.sh $ck /work/exp/r2/eval/s${s}_last_ens${ens}_steps${st} val --model.ensemble $ens --model.sampling_steps $st; }
for cfg in "1 5" "4 5" "8 5" "1 20" "4 20"; do
  run 0 $cfg & run 1 $cfg; wait
done
