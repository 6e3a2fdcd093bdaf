#!/bin/sh
# One-shot `init` of docker-compose.yml: give an empty model store its first models, so that
# `docker compose up` runs RL in imagination end to end on a laptop CPU in a few minutes:
#   1. a small MetaWorld dataset (noisy scripted expert) in /data/$INIT_TASK,
#   2. a tiny flow-matching policy trained on it (the learner needs a trainable policy),
#      published as `stable` and `candidate`,
#   3. the value and dynamics baselines (linear value, persistence dynamics) as `stable`;
#      INIT_TRAIN=all trains tiny ones on the same data instead.
# A store that already has them is left as it is (delete the volumes to start over).
set -eu

store=${RISE_REGISTRY_ROOT:-/models}
task=${INIT_TASK:-reach}
tier=${INIT_TIER:-tiny}
data=/data/$task
work=/runs/init

if python - "$store" <<'PY'
import sys
from rise.registry import Registry
r = Registry(sys.argv[1])
ok = all("stable" in r.aliases(m) for m in ("policy", "value", "dynamics")) and "candidate" in r.aliases("policy")
sys.exit(0 if ok else 1)
PY
then
  echo "init: $store already has stable policy, value and dynamics models; nothing to do"
  rise models list
  exit 0
fi

if [ ! -d "$data/meta" ]; then
  echo "init: collecting ${INIT_EPISODES:-6} episodes of $task into $data"
  rm -rf "$data.partial"
  rise data collect --task "$task" --episodes "${INIT_EPISODES:-6}" --max-steps "${INIT_MAX_STEPS:-60}" \
    --noise "${INIT_NOISE:-0.3}" --out "$data.partial"
  mv "$data.partial" "$data"
fi

echo "init: training a $tier policy (${INIT_POLICY_STEPS:-30} steps)"
rm -rf "$work/policy"
rise train policy --config "$tier" --data "$data" --out "$work/policy" --steps "${INIT_POLICY_STEPS:-30}" \
  --publish --registry "$store" --device "${INIT_DEVICE:-auto}" --threads 1
rise models alias policy stable latest
rise models alias policy candidate latest

if [ "${INIT_TRAIN:-baselines}" = all ]; then
  for model in value dynamics; do
    rm -rf "${work:?}/$model"
    rise train "$model" --config "$tier" --data "$data" --out "$work/$model" --publish --registry "$store" \
      --device "${INIT_DEVICE:-auto}" --threads 1
    rise models alias "$model" stable latest
  done
else
  rise models baseline value --alias stable
  rise models baseline dynamics --alias stable
fi
rise models list
