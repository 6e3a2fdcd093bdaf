"""RISE-serve shared runtime: contract stubs, tensor codec, server builder, model registry.

Light at import: nothing here pulls in torch.
"""

__version__ = "0.1.0"
