"""Tests of Qwen2.5-VL's vision encoder in ONNX (``rtrt.export.vlm_onnx_qwen``) and its numpy index
inputs (``rtrt.runtime.vlm_ort.qwen_vision``), against the stock transformers tower.

The tiny Qwen2.5-VL of ``tests/fixtures/tiny_vlm.py`` has window attention in block 0 (windows of
2x2 merged tokens) and full attention in block 1. Its vision weights are re-drawn with std
``VISION_STD``: at transformers' 0.02 the tower is so flat that swapping the rotary axes changes its
output by 6e-6, under the tolerance; at 0.15 every wrong index input moves it by more than 0.1
while the ORT encoder stays within 1e-5 of the stock tower.

Run: ``.venv/bin/pytest tests/test_vlm_onnx_qwen.py``
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from rtrt.export import vlm_onnx
from rtrt.export.common import ExportError
from rtrt.export.vlm_onnx_qwen import QwenVisionEncoder, export_qwen_vision
from rtrt.runtime.errors import InputError, ModelMismatchError
from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.runtime.names import QWEN_VISION_INPUTS, VLM_VISION_OUTPUTS
from rtrt.runtime.vlm import load_vlm
from rtrt.runtime.vlm.qwen2_5_vl import Qwen2_5_VLFamily
from rtrt.runtime.vlm_ort.qwen_vision import qwen_vision_inputs
from fixtures import tiny_vlm

TOL = 1e-4  # fp32; a correct graph is at ~1e-5, a wrong index input at > 0.1
VISION_STD = 0.15
TWO_IMAGES = [(56, 112), (112, 84)]  # (height, width): grids [1, 4, 8] and [1, 8, 6]


def _sharpen(tower: nn.Module, seed: int) -> None:
    """Redraw the tower's linear and patch weights with std ``VISION_STD`` (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in tower.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * VISION_STD)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * VISION_STD)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_vlm.build_tiny_vlm("qwen2_5_vl", tmp_path_factory.mktemp("tiny_qwen") / "vlm")


@pytest.fixture(scope="module")
def qwen(tiny_dir):
    family = load_vlm(tiny_dir)
    _sharpen(family.model.model.visual, seed=1)
    return family


@pytest.fixture(scope="module")
def config_json(tiny_dir) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def encoder(qwen, tmp_path_factory):
    path = export_qwen_vision(qwen, tmp_path_factory.mktemp("qwen_onnx") / "vision_encoder.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _batch(family, sizes):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    return family.prepare(images, ["What is in the image?"] * len(images))


def _feeds(batch, config: dict) -> dict[str, np.ndarray]:
    grid = batch["image_grid_thw"].numpy()
    return {"pixel_values": batch["pixel_values"].numpy(), **qwen_vision_inputs(grid, config)}


def _stock(family, batch) -> np.ndarray:
    with torch.no_grad():
        return family.visual_tokens(batch).numpy()


# ---------------------------------------------------------------- numpy index inputs
def _recorded_indices(tower, grid: np.ndarray) -> dict[str, np.ndarray]:
    """The indices the stock tower's forward computes for ``grid``, recorded as it runs."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as stock

    seen: dict[str, np.ndarray] = {}

    def record(fn, *names):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            for name, value in zip(names, out if len(names) > 1 else (out,)):
                if name is not None:  # max_seqlen, None without flash attention
                    seen[name] = value.numpy()
            return out
        return wrapped

    pixels = torch.randn(int(grid.prod(-1).sum()), tower.patch_embed.proj.weight[0].numel())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stock, "get_vision_position_ids", record(stock.get_vision_position_ids, "rotary_pos_ids"))
        mp.setattr(stock, "get_vision_attention_seqlens", record(stock.get_vision_attention_seqlens, "cu_seqlens", None))
        mp.setattr(stock, "get_vision_window_index", record(stock.get_vision_window_index, "window_index", "cu_window_seqlens"))
        with torch.no_grad():
            tower(pixels, grid_thw=torch.from_numpy(grid))
    return seen


def test_indices_equal_what_the_stock_tower_computes(qwen, config_json):
    grid = np.array([[1, 4, 8], [1, 8, 6], [2, 6, 4]])
    stock = _recorded_indices(qwen.model.model.visual, grid)
    ours = qwen_vision_inputs(grid, config_json)
    assert set(ours) == set(QWEN_VISION_INPUTS[1:]) == set(stock)
    for name in ours:
        assert ours[name].dtype == np.int64
        np.testing.assert_array_equal(ours[name], stock[name], err_msg=name)
    # Windows split the images here (window attention is on), and an empty window dropped out.
    assert len(ours["cu_window_seqlens"]) > len(ours["cu_seqlens"])


@pytest.mark.parametrize("merge,patch,window", [(1, 14, 56), (2, 14, 112), (3, 14, 126), (2, 16, 64), (2, 14, 28)])
def test_indices_equal_the_stock_functions_on_other_configs(merge, patch, window):
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    grid = np.array([[1, 4 * merge, 6 * merge], [2, 3 * merge, merge], [1, 9 * merge, 5 * merge]])
    config = {"vision_config": {"patch_size": patch, "spatial_merge_size": merge, "window_size": window}}
    ours = qwen_vision_inputs(grid, config)
    g = torch.from_numpy(grid)
    window_index, cu_windows = get_vision_window_index(g, merge, window, patch)
    np.testing.assert_array_equal(ours["rotary_pos_ids"], get_vision_position_ids(g, merge).numpy())
    np.testing.assert_array_equal(ours["cu_seqlens"], get_vision_cu_seqlens(g).numpy())
    np.testing.assert_array_equal(ours["window_index"], window_index.numpy())
    np.testing.assert_array_equal(ours["cu_window_seqlens"], cu_windows.numpy())


def test_indices_refuse_bad_grids_and_configs(config_json):
    with pytest.raises(InputError, match="multiples of the merge size 2"):
        qwen_vision_inputs(np.array([[1, 4, 5]]), config_json)
    with pytest.raises(InputError, match="shape"):
        qwen_vision_inputs(np.array([1, 4, 4]), config_json)
    with pytest.raises(InputError, match="positive"):
        qwen_vision_inputs(np.array([[0, 4, 4]]), config_json)
    with pytest.raises(ModelMismatchError, match="'llava' model, not Qwen2.5-VL"):
        qwen_vision_inputs(np.array([[1, 4, 4]]), {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"}})
    with pytest.raises(ModelMismatchError, match="'clip_vision_model', not Qwen2.5-VL's"):
        qwen_vision_inputs(np.array([[1, 4, 4]]), {"model_type": "clip_vision_model", "patch_size": 14})
    with pytest.raises(ModelMismatchError, match="smaller than one merged token"):
        qwen_vision_inputs(np.array([[1, 4, 4]]), {"vision_config": {"window_size": 16}})


def test_indices_take_config_json_or_its_vision_config(config_json):
    grid = np.array([[1, 4, 8], [1, 8, 6]])
    whole = qwen_vision_inputs(grid, config_json)
    vision = qwen_vision_inputs(grid, config_json["vision_config"])
    assert all(np.array_equal(whole[k], vision[k]) for k in whole)
    # Released checkpoints' vision_config has no model_type; transformers' defaults fill missing keys.
    released = {k: v for k, v in config_json["vision_config"].items() if k not in ("model_type", "patch_size")}
    assert all(np.array_equal(whole[k], v) for k, v in qwen_vision_inputs(grid, released).items())


# ---------------------------------------------------------------- the ONNX encoder
def test_encoder_graph_inputs_and_dynamic_axes(encoder):
    assert [i.name for i in encoder.get_inputs()] == list(QWEN_VISION_INPUTS)
    assert [o.name for o in encoder.get_outputs()] == list(VLM_VISION_OUTPUTS)
    shapes = {i.name: i.shape for i in encoder.get_inputs()}
    assert all(isinstance(shapes[name][0], str) for name in QWEN_VISION_INPUTS)  # every count is dynamic


def test_encoder_equals_stock_on_two_non_square_images(qwen, encoder, config_json):
    batch = _batch(qwen, TWO_IMAGES)
    grid = batch["image_grid_thw"].tolist()
    assert grid[0] != grid[1] and all(h != w for _, h, w in grid)
    feeds = _feeds(batch, config_json)
    assert len(feeds["cu_window_seqlens"]) > len(feeds["cu_seqlens"])  # window attention splits them
    out = encoder.run(None, feeds)[0]
    ref = _stock(qwen, batch)
    assert out.shape == ref.shape == (int(qwen.image_mask(batch).sum()), qwen.hidden_size)
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("size", [(84, 56), (56, 56), (112, 112)])
def test_encoder_equals_stock_on_one_image_of_another_grid(qwen, encoder, config_json, size):
    batch = _batch(qwen, [size])
    # The export traced grids [1, 4, 8] and [1, 12, 4]; 56x56 has a single window.
    assert batch["image_grid_thw"].tolist()[0] not in ([1, 4, 8], [1, 12, 4])
    np.testing.assert_allclose(encoder.run(None, _feeds(batch, config_json))[0], _stock(qwen, batch), rtol=0, atol=TOL)


def test_encoder_reads_every_index_input(qwen, encoder, config_json):
    # Each input, replaced by a plausible wrong value, moves the output far beyond the tolerance.
    batch = _batch(qwen, TWO_IMAGES)
    feeds = _feeds(batch, config_json)
    ref = _stock(qwen, batch)
    wrong = {
        "rotary_pos_ids": feeds["rotary_pos_ids"][:, ::-1].copy(),
        "window_index": np.arange(len(feeds["window_index"]), dtype=np.int64),
        "cu_seqlens": feeds["cu_seqlens"][[0, -1]],
        "cu_window_seqlens": feeds["cu_seqlens"],
    }
    for name, value in wrong.items():
        err = np.abs(encoder.run(None, {**feeds, name: value})[0] - ref).max()
        assert err > 100 * TOL, name


# ---------------------------------------------------------------- another config, refined
@pytest.fixture(scope="module")
def windowed(tiny_dir):
    """The tiny model with a deeper tower: 4x4-token windows in blocks 0 and 2, full attention in 1, 2 heads."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_dir)
    vision = config.vision_config
    vision.depth, vision.fullatt_block_indexes, vision.window_size, vision.num_heads = 3, [1], 112, 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _sharpen(model.model.visual, seed=3)
    return Qwen2_5_VLFamily(model, processor=None)


@pytest.fixture(scope="module")
def adapter_and_w():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        adapter = CrossAttentionAdapter(tiny_vlm.TEXT_HIDDEN, width=32, heads=4).eval()
        with torch.no_grad():
            adapter.gate.fill_(0.8)
        W = torch.randn(5, tiny_vlm.TEXT_HIDDEN)
    return adapter, W


@pytest.fixture(scope="module")
def refined_path(windowed, adapter_and_w, tmp_path_factory):
    # Weights beside the graph, as a real Qwen2.5-VL tower (over 2 GB in fp32) is written.
    path = tmp_path_factory.mktemp("qwen_refined") / "vision_encoder_refined.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vlm_onnx, "EXTERNAL_DATA_BYTES", 0)
        return export_qwen_vision(windowed, path, *adapter_and_w)


def test_refined_encoder_equals_adapter_of_stock(windowed, adapter_and_w, refined_path):
    adapter, W = adapter_and_w
    grid = np.array([[1, 12, 20], [1, 18, 8]])  # 6x10 and 9x4 tokens: partly filled 4x4 windows
    config = windowed.model.config.to_dict()
    feeds = qwen_vision_inputs(grid, config)
    assert len(feeds["cu_window_seqlens"]) - 1 == 6 + 3
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(5))
    batch = {"pixel_values": pixels, "image_grid_thw": torch.from_numpy(grid)}
    with torch.no_grad():
        stock = windowed.visual_tokens(batch)
        ref = adapter(stock[None], W)[0].numpy()
    assert np.abs(ref - stock.numpy()).max() > 100 * TOL  # the adapter does change the tokens
    session = ort.InferenceSession(str(refined_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"pixel_values": pixels.numpy(), **feeds})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


def test_refined_encoder_keeps_its_weights_beside_it(refined_path):
    data = refined_path.parent / f"{refined_path.name}_data"
    assert data.stat().st_size > refined_path.stat().st_size
    model = onnx.load(str(refined_path), load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}["rtrt.graph"] == "vision_encoder_refined"


def test_export_refuses_half_a_refinement_and_other_families(qwen, adapter_and_w, tmp_path):
    adapter, _ = adapter_and_w
    with pytest.raises(ExportError, match="both the adapter and W"):
        QwenVisionEncoder(qwen.model.model.visual, adapter, None)
    other = type("Other", (), {"name": "llava"})()
    with pytest.raises(ExportError, match="not 'llava'"):
        export_qwen_vision(other, tmp_path / "x.onnx")
