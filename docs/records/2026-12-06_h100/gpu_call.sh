#!/usr/bin/env bash
# 1) training speed: main's step (emulated) vs the new loop, 6x256 and 12x512 (GPU alone)
# 2) learning curves to the plateau rule: 6 datasets x 2 kinds, seed 0, sharing the GPU, + kernel check
set -u
cd "$(dirname "$0")/.."
R=$PWD; OO=${OUT:-/tmp/out}; O=/tmp/res; mkdir -p $O $OO
export PYTHONUNBUFFERED=1
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; python3 -c 'import torch,triton,numpy;print("torch",torch.__version__,"triton",triton.__version__,"numpy",numpy.__version__)'; python3 --version; date -u; } > $O/versions.txt 2>&1
cat $O/versions.txt
cd $R/.gpu/tr; export PYTHONPATH=$PWD/src
mkdir -p $O/speed
S="python3 -m sigmoid_sc.cli training-speed --steps 20 --warmup 5 --job-timeout 80"
timeout 120 $S --tokens $R/.gpu/tok/pbmc3k.npz --config configs/shared_data.yaml --label 6x256 --variants today:64@1 tokens@1,4 tokens+compile@1 --time-limit 80 --out $O/speed/6x256 > $O/speed/6x256.log 2>&1
timeout 75 $S --tokens $R/.gpu/tok/pbmc3k_4k2048.npz --config configs/paper.yaml --label 12x512 --variants tokens@1 tokens+compile@1 --time-limit 45 --out $O/speed/12x512 > $O/speed/12x512.log 2>&1
cat $O/speed/*/training_speed.md 2>/dev/null | head -40
echo "speed done at +$(( $(date +%s)-T0 ))s"
(cd $R/.gpu/kernel && PYTHONPATH=$R/.gpu/kernel/src timeout 230 python3 bench/check_kernel.py --jobs 4 > $O/check_kernel.txt 2>&1; echo "check_kernel rc=$?" >> $O/check_kernel.txt) &
ck=$!
M='{"n_layers":6,"d_model":256,"n_heads":8,"d_ff":1024,"dropout":0.1}'
TR='{"steps":6000,"batch_tokens":65536,"schedule":"constant","stop":{"rule":"plateau","window":0.2,"min_rel_improvement":0.01,"min_steps":600},"lr":0.001,"weight_decay":0.01,"warmup_steps":200,"mask_prob":0.15,"eval_every":100,"checkpoint_every":100000,"precision":"bf16"}'
pids=(); runs=()
for d in pbmc3k baron_pancreas kidney cbmc worm_neuron bladder; do for a in softmax sigmoid; do
  mkdir -p /tmp/curves/${d}_$a; runs+=(${d}_$a)
  python3 -m sigmoid_sc.cli train --dataset $d --tokens $R/.gpu/tok/$d.npz --attention $a --seed 0 \
     --model-json "$M" --train-json "$TR" --device cuda --out-dir /tmp/curves/${d}_$a > /tmp/curves/${d}_$a.log 2>&1 &
  pids+=($!)
done; done
end=$(( $(date +%s) + ${CURVE_S:-280} ))
while [ $(date +%s) -lt $end ] && kill -0 "${pids[@]}" 2>/dev/null; do sleep 5; done
kill -TERM "${pids[@]}" 2>/dev/null; wait "${pids[@]}"
for r in "${runs[@]}"; do
  if [ -f /tmp/curves/$r/history.csv ]; then sed "s/^/$r,/" /tmp/curves/$r/history.csv >> $O/curves_done.csv;
  else python3 $R/.gpu/profile_train.py curve-history --checkpoint /tmp/curves/$r/checkpoint.pt --run $r --out $O/curves_cut.csv > /dev/null 2>&1 || echo "$r: no history"; fi
  tail -2 /tmp/curves/$r.log | tr '\r' '\n' | tail -2 | sed "s/^/$r: /"
done > $O/curve_logs.txt 2>&1
mkdir -p /tmp/emb; epids=()
for r in "${runs[@]}"; do if [ -f /tmp/curves/$r/model.pt ]; then d=${r%_*};
  python3 -m sigmoid_sc.cli embed --dataset $d --tokens $R/.gpu/tok/$d.npz --model /tmp/curves/$r/model.pt --device cuda --output /tmp/emb/$r.npz > /tmp/emb/$r.log 2>&1 & epids+=($!); fi; done
wait "${epids[@]}" 2>/dev/null
(cd /tmp && tar czf $OO/embeddings.tar.gz emb) ; ls /tmp/emb | head -40
wait $ck
cat $O/curve_logs.txt | cut -c1-200
tail -25 $O/check_kernel.txt
echo "done at +$(( $(date +%s)-T0 ))s"
(cd /tmp && tar czf $OO/results.tar.gz res)
cp $O/curve_logs.txt $O/check_kernel.txt $OO/ 2>/dev/null; ls -la $OO
