"""The value service: multi-view frames + task -> progress in [-1, 1]."""
