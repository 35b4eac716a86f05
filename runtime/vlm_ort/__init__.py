"""The torch-free VLM runtime: the bundle's exported VLM (``rtrt export --vlm``) on ONNX Runtime.

Image preprocessing in numpy, the chat template with jinja2, ``tokenizers``, and the vision
encoder, token embedding and decoder graphs with a KV cache, decoded greedily. Nothing here imports
torch or transformers: it is what a vehicle runs.

- ``OrtVLM`` (model.py): the graphs and the greedy loop; ``Pipeline(vlm_backend="ort")`` uses it.
- ``VlmProcessor`` (prompt.py): the VLM folder's processor, chat template and tokenizer in numpy.
- ``load_image_processor`` / ``resize_bicubic`` (preprocess.py): the families' image processors.
- ``qwen_vision_inputs`` (qwen_vision.py): Qwen2.5-VL's grid-dependent vision-encoder inputs.
"""
from __future__ import annotations

import importlib

# public name -> submodule that defines it (imported on first use, PEP 562: no onnxruntime at import)
_EXPORTS = {
    "OrtVLM": "model",
    "VLM_PRECISIONS": "model",
    "VlmProcessor": "prompt",
    "step_position_ids": "prompt",
    "load_image_processor": "preprocess",
    "resize_bicubic": "preprocess",
    "qwen_vision_inputs": "qwen_vision",
    "QwenVisionConfig": "qwen_vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
