"""Qwen2.5-VL's vision encoder inputs that depend on the image grid, computed in numpy.

The stock tower (transformers' ``Qwen2_5_VisionTransformerPretrainedModel.forward``) derives four
index tensors from ``image_grid_thw`` with Python loops (``transformers.vision_utils``:
``get_vision_position_ids``, ``get_vision_cu_seqlens``, ``get_vision_window_index``). Those loops
cannot live in an ONNX graph without data-dependent control flow, so the exported encoder
(``rtrt.export.vlm_onnx_qwen``) takes them as inputs and the runtime computes them here:

- ``rotary_pos_ids`` int64 [P, 2]: each patch's (row, column) in its image, patches listed as the
  processor flattens them (merge block by merge block), repeated for every temporal frame;
- ``window_index`` int64 [P / merge**2]: the merged-token order that groups each attention window's
  tokens together (the graph gathers into it and scatters back after the merger);
- ``cu_seqlens`` int64 [frames + 1]: where each frame's patches start and end (full attention);
- ``cu_window_seqlens`` int64 [windows + 1]: where each window starts and ends in the window order,
  empty windows removed (the stock ``unique_consecutive`` step).

``qwen_vision_inputs(grid_thw, config)`` returns them with ``pixel_values`` left to the caller;
``config`` is the VLM's ``config.json`` as a dict, or its ``vision_config``. Imports numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import InputError, ModelMismatchError

__all__ = ["QwenVisionConfig", "qwen_vision_inputs"]

_VISION_TYPES = ("qwen2_5_vl_vision", "qwen2_5_vl")  # model_type of a Qwen2.5-VL vision_config (absent in the released ones)


@dataclass(frozen=True)
class QwenVisionConfig:
    """The vision-config values the index inputs depend on (``config.json``'s ``vision_config``)."""

    patch_size: int = 14  # pixels per patch side (transformers' default where config.json omits it)
    spatial_merge_size: int = 2  # patches per side of the block the merger turns into one token
    window_size: int = 112  # side of an attention window in pixels (window-attention blocks)

    @classmethod
    def from_config(cls, config: Mapping) -> "QwenVisionConfig":
        """From the VLM's ``config.json`` dict or its ``vision_config`` dict."""
        if "vision_config" in config:  # the whole config.json
            if config.get("model_type", "qwen2_5_vl") != "qwen2_5_vl":
                raise ModelMismatchError(f"config.json is a {config.get('model_type')!r} model, not Qwen2.5-VL")
            vision = config["vision_config"]
        else:
            vision = config
        if not isinstance(vision, Mapping) or vision.get("model_type", "qwen2_5_vl_vision") not in _VISION_TYPES:
            kind = vision.get("model_type") if isinstance(vision, Mapping) else type(vision).__name__
            raise ModelMismatchError(f"vision_config is a {kind!r}, not Qwen2.5-VL's")
        defaults = cls()
        values = {}
        for key in ("patch_size", "spatial_merge_size", "window_size"):
            value = vision.get(key, getattr(defaults, key))
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelMismatchError(f"vision_config.{key} must be a positive integer, got {value!r}")
            values[key] = value
        out = cls(**values)
        if out.window_tokens == 0:
            raise ModelMismatchError(
                f"vision_config.window_size {out.window_size} is smaller than one merged token "
                f"({out.spatial_merge_size * out.patch_size} px)"
            )
        return out

    @property
    def window_tokens(self) -> int:
        """Merged tokens per side of an attention window."""
        return self.window_size // self.spatial_merge_size // self.patch_size


def _grid(grid_thw, merge: int) -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise InputError(f"image_grid_thw must be integers of shape [images, 3], got {grid.dtype} {list(grid.shape)}")
    if (grid <= 0).any():
        raise InputError(f"image_grid_thw must be positive, got {grid.tolist()}")
    if (grid[:, 1:] % merge).any():
        raise InputError(f"image_grid_thw heights and widths must be multiples of the merge size {merge}, got {grid.tolist()}")
    return grid.astype(np.int64)


def _rotary_pos_ids(t: int, h: int, w: int, merge: int) -> np.ndarray:
    # (row, column) of each patch in the processor's order: merge blocks row-major, then the
    # patches inside a block row-major.
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def _windows(t: int, h: int, w: int, cfg: QwenVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    # Merged tokens of one image, padded up to whole windows (a full extra window when the side
    # divides evenly, as the stock code does; it is empty and drops out), listed window by window.
    side = cfg.window_tokens
    lh, lw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
    ph, pw = lh + side - lh % side, lw + side - lw % side
    padded = np.full((t, ph, pw), -1, dtype=np.int64)
    padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    padded = padded.reshape(t, ph // side, side, pw // side, side).transpose(0, 1, 3, 2, 4).reshape(t, -1, side * side)
    sizes = (padded >= 0).sum(-1).reshape(-1)  # merged tokens per window
    flat = padded.reshape(-1)
    return flat[flat >= 0], sizes


def qwen_vision_inputs(grid_thw, config: Mapping) -> dict[str, np.ndarray]:
    """The encoder's index inputs for images of ``grid_thw`` [images, 3] (t, h, w in patches).

    Keys are ``QWEN_VISION_INPUTS`` without ``pixel_values``; every array is int64. ``config`` is
    the VLM's ``config.json`` dict or its ``vision_config``. The values equal what the stock tower
    computes for the same grid.
    """
    cfg = QwenVisionConfig.from_config(config)
    merge = cfg.spatial_merge_size
    unit = merge * merge
    grid = _grid(grid_thw, merge)
    pos, order, frames, windows = [], [], [], []
    offset = 0  # merged tokens of the images before this one
    for t, h, w in grid.tolist():
        pos.append(_rotary_pos_ids(t, h, w, merge))
        index, sizes = _windows(t, h, w, cfg)
        order.append(index + offset)
        windows.append(sizes * unit)
        frames.append(np.full(t, h * w, dtype=np.int64))
        offset += t * h * w // unit
    cu_seqlens = np.concatenate([[0], np.cumsum(np.concatenate(frames))])
    cu_windows = np.concatenate([[0], np.cumsum(np.concatenate(windows))])
    # Empty windows repeat a boundary; the stock code removes repeats (unique_consecutive).
    cu_windows = cu_windows[np.concatenate([[True], cu_windows[1:] != cu_windows[:-1]])]
    return {
        "rotary_pos_ids": np.concatenate(pos).astype(np.int64),
        "window_index": np.concatenate(order).astype(np.int64),
        "cu_seqlens": cu_seqlens.astype(np.int64),
        "cu_window_seqlens": cu_windows.astype(np.int64),
    }
