"""The torch-free VLM runtime: the bundle's exported VLM (``rtrt export --vlm``) on ONNX Runtime.

Image preprocessing in numpy, the chat template with jinja2, ``tokenizers``, and the vision
encoder, token embedding and decoder graphs with a KV cache, decoded greedily. Nothing here imports
torch or transformers: it is what a vehicle runs.
"""
from __future__ import annotations

__all__ = ["OrtVLM", "VLM_PRECISIONS"]


def __getattr__(name: str):
    # Lazy (PEP 562): importing the package does not import onnxruntime.
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
