#!/bin/bash
# The second device call (the same warm machine, 2026-11-27 ~14:31 UTC): the run the first call's
# deadline stopped (checkpoint at transformer step 10,750) continued with --compile until this
# call's 270 s limit (checkpoint at 14,250). It ran as an inline Python call of
# services.dynamics.train.train(..., resume=True, preloaded=load_cache(...), compile_loss=True);
# `bench/dynamics_steps.py train` now resumes a stopped run itself, so the same is:
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 270 python3 bench/dynamics_steps.py train --cache .gpu/push.npz.xz --steps 15000 --threads 4 --compile --out /tmp/steps
# The last 750 steps ran on the CPU with the table stage's own command:
#   rise train dynamics --config small --data runs/table-push/push/data --out runs/table-push/push/dynamics \
#     --resume --threads 1 --set training.seed=0
