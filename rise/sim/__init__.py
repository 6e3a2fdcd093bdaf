"""Ground truth: the MetaWorld v3 simulator, its scripted experts, and evaluation."""
