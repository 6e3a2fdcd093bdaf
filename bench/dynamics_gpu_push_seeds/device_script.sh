#!/bin/bash
# One device call (issue 7): push's default world model (small tier, 1,000 + 15,000 steps) for
# training seeds 1 and 2, side by side on one GPU with --compile, from the table's push data
# (exported by `bench/dynamics_steps.py export` into .gpu/push.npz.xz; the data do not depend on
# the training seed). Each checkpoint goes to `runs/table-push-rise-seed<N>/push/dynamics/`, where
# the table's `dynamics` stage resumes it (and finishes on the CPU what the deadline left).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
export PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-540}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; from PIL import features; print(torch.__version__, \"webp\", features.check(\"webp\"))"
for seed in 1 2; do
  (python3 bench/dynamics_steps.py train --cache .gpu/push.npz.xz --steps 15000 --threads 6 --compile \
     --set training.seed=$seed --deadline-s $DEADLINE --out /tmp/seed$seed > $OUT/seed$seed-train.log 2>&1) &
done
wait
for seed in 1 2; do
  run=/tmp/seed$seed/steps15000
  tail -3 $run.log
  [ -f $run/checkpoint.pt ] && python3 -c "import torch; c=torch.load('$run/checkpoint.pt', weights_only=False, map_location='cpu'); print('seed $seed checkpoint', c['stage'], c['step'])"
  split -b 15M -d $run/checkpoint.pt $OUT/seed$seed-checkpoint.pt.part
  tar czf $OUT/seed$seed-run.tgz -C /tmp/seed$seed steps15000.log $(cd /tmp/seed$seed && ls -d steps.json steps15000/tensorboard 2>/dev/null)
done
ls -la $OUT
# 2026-11-28 (one H200, DEADLINE=530, timeout_s 595): both runs finished all 15,000 transformer
# steps in 510 s (30.2 ms per step side by side, compiled; autoencoder 21 s); 569 s of device time
# in all. Logs beside this script (seed<N>-train.log: progress; seed<N>-run.log: the trainer's log).
