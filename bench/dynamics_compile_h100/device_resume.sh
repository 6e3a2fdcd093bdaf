#!/bin/bash
# The second device call (same warm machine, 2026-11-27 ~14:31 UTC): the run stopped by the first
# call's deadline (checkpoint at transformer step 10,750) continued with --compile until its own
# 270 s limit (checkpoint at 14,250). The last 750 steps ran on the CPU:
#   rise train dynamics --config small --data runs/table-push/push/data --out runs/table-push/push/dynamics \
#     --resume --threads 1 --set training.seed=0
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 270 python3 -c "
import sys; sys.path.insert(0,'bench'); sys.path.insert(0,'.')
from dynamics_steps import load_cache
from services.dynamics.model import load_model_config
from services.dynamics.train import train
from pathlib import Path
ep, norm = load_cache(Path('.gpu/push.npz.xz'))
cfg = load_model_config('small', {'training.transformer.steps': 15000})
s = train(cfg, list(ep.roots), Path('/tmp/steps/steps15000'), resume=True, progress=False, threads=4, preloaded=(ep, norm), compile_loss=True)
"
