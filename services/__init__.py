"""The model services (policy, value, dynamics) and the trainer: each folder holds its models,
their training code and its server."""
