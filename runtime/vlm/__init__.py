"""The frozen VLMs rtrt plugs into: family detection, loading, and the per-family wrappers.

``load_vlm(ref)`` loads a local directory (offline) or a hub id pinned to a commit with its
processor, detects the family from the config and returns a ``VLMFamily`` whose model is in eval
mode with every parameter frozen. Weights are safetensors only. Supported: LLaVA-1.5, Qwen2.5-VL, InternVL3 (``-hf`` checkpoints).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..errors import InputError, ModelMismatchError
from .base import HINT_TEMPLATE, VLMFamily, format_hint
from .internvl import InternVLFamily
from .llava import LlavaFamily
from .qwen2_5_vl import Qwen2_5_VLFamily

__all__ = ["VLMFamily", "load_vlm", "detect_family", "FAMILIES", "HINT_TEMPLATE", "format_hint"]

# family name -> wrapper class; the order is the order of the error message.
FAMILIES: dict[str, type[VLMFamily]] = {f.name: f for f in (LlavaFamily, Qwen2_5_VLFamily, InternVLFamily)}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.model_class})" for f in FAMILIES.values())


def detect_family(config) -> type[VLMFamily]:
    """The ``VLMFamily`` subclass for a transformers config (or its dict), from ``model_type`` and ``architectures``."""
    if isinstance(config, Mapping):
        model_type, architectures = config.get("model_type"), config.get("architectures")
    else:
        model_type, architectures = getattr(config, "model_type", None), getattr(config, "architectures", None)
    architectures = list(architectures or [])
    for family in FAMILIES.values():
        if model_type in family.model_types:
            # A config of the right type but another head (e.g. a bare base model) cannot generate.
            if architectures and family.model_class not in architectures:
                raise ModelMismatchError(
                    f"model_type {model_type!r} with architectures {architectures} is not {family.model_class}"
                )
            return family
    raise ModelMismatchError(
        f"unsupported VLM: model_type {model_type!r}, architectures {architectures}; supported: {_supported()}"
        " (InternVL needs its -hf checkpoint)"
    )


def load_vlm(ref: str | Path, *, dtype=None, device="cpu", revision: str | None = None) -> VLMFamily:
    """Load a VLM and its processor from a local directory (offline) or a pinned hub id; frozen, eval mode.

    ``ref``: a local directory, or a hub id pinned to a 40-hex commit, ``org/name@<commit>`` (what
    ``Bundle.resolve_ref`` returns) or ``org/name`` with ``revision``; an unpinned hub id is an
    ``InputError``. ``dtype``: a ``torch.dtype`` (or ``"auto"``), ``None`` for transformers' default.
    Only safetensors weights are loaded (a checkpoint with only ``pytorch_model.bin`` is refused);
    remote code is never run.
    """
    import transformers

    from ..bundle import pinned_source

    source, revision = pinned_source(ref, revision, what="VLM")
    if revision is None and not Path(source).is_dir():
        raise InputError(f"{source}: a VLM is a model directory, not a file")
    common = {"local_files_only": revision is None, "trust_remote_code": False, "revision": revision}
    try:
        config = transformers.AutoConfig.from_pretrained(source, **common)
    except ValueError as err:  # an unknown model_type (e.g. remote-code InternVL) or remote code required
        raise ModelMismatchError(f"cannot read the VLM config of {source}: {_one_line(err)}") from err
    except OSError as err:
        raise InputError(f"cannot find a VLM at {source}: {_one_line(err)}") from err
    family = detect_family(config)
    weights = getattr(config, "transformers_weights", None)  # a config may name its weights file; safetensors only
    if weights and not str(weights).endswith((".safetensors", ".safetensors.index.json")):
        raise InputError(f"{source}: config names weights {weights!r}; rtrt loads safetensors weights only")
    model_kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = getattr(transformers, family.model_class).from_pretrained(
            source, config=config, use_safetensors=True, **model_kwargs, **common)
    except OSError as err:  # e.g. only a pytorch_model.bin: rtrt never unpickles weights
        raise InputError(f"cannot load the VLM's safetensors weights at {source} (safetensors are required): "
                         f"{_one_line(err)}") from None
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, **common)
    except OSError as err:
        raise InputError(f"cannot load the VLM at {source}: {_one_line(err)}") from err
    model.to(device).eval()
    model.requires_grad_(False)
    return family(model, processor)
