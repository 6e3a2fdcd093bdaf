#!/bin/bash
# One device call: the push world model (small tier, 15,000 steps, the table's data) trained with
# --compile; an eager run of the same config beside it for its first ~200 s gives the ratio.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print(torch.__version__)"
mkdir -p /tmp/eager
(timeout 250 python3 bench/dynamics_steps.py train-one --cache .gpu/push.npz.xz --steps 15000 --out /tmp/eager/run --threads 4 > $OUT/eager.log 2>&1) &
python3 bench/dynamics_steps.py train --cache .gpu/push.npz.xz --steps 15000 --threads 4 --compile --deadline-s 455 --out /tmp/steps 2>&1 | tee $OUT/train.log
wait
run=/tmp/steps/steps15000
ls -la $run $run/model 2>&1 | tee -a $OUT/train.log
python3 - <<'PY'
import glob, os, shutil
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = os.environ["OUT"]
for name, d in (("compiled", "/tmp/steps/steps15000/tensorboard"), ("eager", "/tmp/eager/run/tensorboard")):
    if not os.path.isdir(d):
        print(name, "no events"); continue
    acc = EventAccumulator(d, size_guidance={"scalars": 0}); acc.Reload()
    tags = acc.Tags()["scalars"]
    rows = [(e.step, e.wall_time, e.value) for e in acc.Scalars("transformer/step_seconds")] if "transformer/step_seconds" in tags else []
    with open(f"{out}/{name}_step_seconds.csv", "w") as f:
        f.write("step,wall_time,step_seconds\n" + "".join(f"{s},{w:.3f},{v:.5f}\n" for s, w, v in rows))
    print(name, "logged steps", len(rows), "last", rows[-1][:1] if rows else None)
PY
cp /tmp/steps/steps.json $OUT/ 2>/dev/null
if [ -f $run/checkpoint.pt ]; then python3 -c "import torch; c=torch.load('$run/checkpoint.pt', weights_only=False, map_location='cpu'); print('checkpoint', c['stage'], c['step'])" | tee -a $OUT/train.log; split -b 15M -d $run/checkpoint.pt $OUT/checkpoint.pt.part; fi
ls -la $OUT
