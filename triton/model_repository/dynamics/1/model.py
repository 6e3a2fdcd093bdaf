# Triton Python-backend entry point for a `dynamics` version: this folder's number is the registry
# version it serves (1 -> v0001), loaded from `rise_registry_root` (config.pbtxt) through the same
# kinds and adapter as `rise serve dynamics` / `rise serve-triton dynamics`. Needs the rise-serve
# package importable by the backend's Python (see triton/README.md in the rise-serve repository).
from services.dynamics.triton import TritonPythonModel  # noqa: F401
