"""The policy service: observation (+ advantage bin) -> action chunk."""
