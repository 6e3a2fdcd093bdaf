"""RL in imagination: rollout workers, Redis replay, learner, ground-truth gate, TrainerService."""
