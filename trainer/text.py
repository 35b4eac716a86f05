"""Text features of class names, synonyms and short descriptions for phase 1.

Two kinds of encoder, chosen by a reference string:

- ``openclip:NAME`` — the CLIP text tower of an open_clip model (``ViT-B-32``, ...). Its BPE
  tokenizer ships inside the open_clip package, so this works offline. Weights come from
  ``weights`` (an open_clip checkpoint file); without them the tower is randomly initialised
  (tests). ``openclip:/path/to/config.json`` registers a custom model config first (tiny towers).
- ``hf:PATH_OR_ID`` — any transformers text encoder (a sentence-transformers model such as
  all-MiniLM-L6-v2 is a transformers model plus mean pooling): mean of the last hidden states over
  the real tokens; a CLIP-style model with ``get_text_features`` uses that instead. A hub id is
  pinned to a commit, ``hf:org/name@<40-hex commit>``; weights are safetensors only.

Features come back L2-normalised, one row per text. ``key`` identifies the encoder and its weights
for the training provenance.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from rtrt.runtime.bundle import sha256_file
from rtrt.runtime.errors import InputError
from rtrt.runtime.modules import display_name

__all__ = ["TextEncoder", "load_text_encoder", "class_texts"]


class TextEncoder:
    """``encode(texts) -> [N, dim]`` L2-normalised features of a frozen text encoder."""

    def __init__(self, ref: str, key: str, dim: int, encode_batch, device: torch.device, pretrained: bool):
        self.ref = ref  # the reference it was loaded from
        self.key = key  # ref plus a hash of the weights
        self.dim = dim  # feature width
        self.device = device
        self.pretrained = pretrained  # False: random weights (only meaningful in tests)
        self._encode_batch = encode_batch

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        chunks = [self._encode_batch(list(texts[i:i + batch_size])).float() for i in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(chunks).cpu(), dim=-1)


def _openclip(name: str, weights: str | None, device: torch.device) -> TextEncoder:
    import open_clip

    if name.endswith(".json"):
        if not Path(name).is_file():
            raise InputError(f"{name}: open_clip model config not found")
        open_clip.add_model_config(name)
        name = Path(name).stem
    if open_clip.get_model_config(name) is None:
        raise InputError(f"unknown open_clip model {name!r}")
    if weights is not None and not Path(weights).is_file():
        raise InputError(f"{weights}: text encoder weights not found")
    model = open_clip.create_model(name, pretrained=weights, device=device).eval()
    tokenizer = open_clip.get_tokenizer(name)
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else int(
        model.encode_text(tokenizer(["x"]).to(device)).shape[-1]
    )
    key = f"openclip:{name}:{sha256_file(weights)[:16] if weights else 'random'}"
    return TextEncoder(f"openclip:{name}", key, dim, lambda texts: model.encode_text(tokenizer(texts).to(device)), device, weights is not None)


def _hf(ref: str, device: torch.device) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer

    from rtrt.runtime.bundle import pinned_source

    try:
        source, revision = pinned_source(ref, what="text encoder")  # a hub id only as org/name@<commit>
    except InputError as e:
        raise InputError(f"cannot load a transformers text encoder: {e}") from None
    local = revision is None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, local_files_only=local)
        model = AutoModel.from_pretrained(source, revision=revision, local_files_only=local,
                                          use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as e:  # includes a model with only a pytorch_model.bin: safetensors only
        raise InputError(f"{ref}: cannot load a transformers text encoder ({str(e).splitlines()[0]})") from None

    def encode(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        if hasattr(model, "get_text_features"):
            out = model.get_text_features(**batch)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    dim = int(encode(["x"]).shape[-1])
    h = hashlib.sha256()
    if local:
        for f in sorted(Path(ref).glob("*.safetensors")) + sorted(Path(ref).glob("*.bin")):
            h.update(sha256_file(f).encode())
    return TextEncoder(f"hf:{ref}", f"hf:{ref}:{h.hexdigest()[:16]}", dim, encode, device, True)


def load_text_encoder(ref: str, weights: str | None = None, device: torch.device | str = "cpu") -> TextEncoder:
    """Load the encoder named by ``ref`` (``openclip:NAME`` or ``hf:PATH_OR_ID``; see the module docstring)."""
    device = torch.device(device)
    kind, sep, name = ref.partition(":")
    if not sep or not name:
        raise InputError(f"text encoder {ref!r}: expected openclip:NAME or hf:PATH_OR_ID")
    if kind == "openclip":
        return _openclip(name, weights, device)
    if kind == "hf":
        if weights is not None:
            raise InputError("--text-weights is for openclip encoders; an hf: encoder loads its own weights")
        return _hf(name, device)
    raise InputError(f"text encoder kind {kind!r} is not supported (openclip or hf)")


def class_texts(names: Sequence[str], synonyms: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
    """Every text of every class (its display name, then its synonyms, duplicates dropped) and its class index."""
    texts: list[str] = []
    owner: list[int] = []
    for c, name in enumerate(names):
        seen: set[str] = set()
        for t in [display_name(name), *synonyms.get(name, [])]:
            t = " ".join(str(t).split())
            if t and t.lower() not in seen:
                seen.add(t.lower())
                texts.append(t)
                owner.append(c)
    return texts, owner
