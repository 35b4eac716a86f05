"""python -m rtrt.tools.benchmarks.scaling on a tiny LLaVA and a tiny bundle (the torch backend: no export)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rtrt.runtime.bundle import VLMSpec, load_bundle
from rtrt.runtime.vlm import load_vlm
from rtrt.tools.benchmarks.scaling import LMSize, _lm_params, bench_scaling, main, parse_sizes, scaled_vlm
from fixtures.tiny_vlm import build_tiny_vlm
from fixtures.tiny_bundle import make_tiny_bundle


def test_parse_sizes():
    assert parse_sizes("192x2, 1024X8") == [LMSize(192, 2), LMSize(1024, 8)]
    for bad in ("192", "192x", "axb", "100x2", "192x0", ""):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    assert main(["--sizes", "12x1"]) == 2


def test_scaled_vlm_keeps_the_vision_side_and_counts_its_parameters(tmp_path):
    src = build_tiny_vlm("llava", tmp_path / "vlm", seed=0)
    out = scaled_vlm(src, tmp_path / "big", LMSize(128, 3))
    fam, ref = load_vlm(out), load_vlm(src)
    cfg, ref_cfg = fam.model.config, ref.model.config
    assert fam.hidden_size == 128 and cfg.text_config.num_hidden_layers == 3 and cfg.text_config.num_attention_heads == 2
    assert cfg.vision_config.to_dict() == ref_cfg.vision_config.to_dict()
    assert fam.image_token_layout() == ref.image_token_layout()
    lm = fam.model.model.language_model
    assert _lm_params(cfg.text_config) == sum(p.numel() for p in lm.parameters())
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    assert fam.prepare([img], ["q"])["input_ids"].shape == ref.prepare([img], ["q"])["input_ids"].shape


def test_bench_scaling_measures_each_size(tmp_path):
    src = build_tiny_vlm("llava", tmp_path / "vlm", seed=0)
    fam = load_vlm(src)
    demo = make_tiny_bundle(tmp_path / "demo", d_llm=fam.hidden_size,
                            vlm=VLMSpec("llava", str(src), fam.hidden_size, fam.image_token_layout()))
    img = tmp_path / "frame.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(img)
    rows = bench_scaling([LMSize(32, 1), LMSize(96, 2)], tmp_path / "work", demo=demo, image=img, runs=1, warmup=0,
                         new_tokens=2, backend="torch", log=lambda _m: None)
    assert [r["lm"] for r in rows] == ["32x1", "96x2"] and rows[0]["lm_params"] < rows[1]["lm_params"]
    for r, hidden in zip(rows, (32, 96)):
        b = load_bundle(r["bundle"])
        assert b.manifest.d_llm == hidden and b.class_embeddings().weight.shape[1] == hidden
        assert b.manifest.class_names == load_bundle(demo).manifest.class_names
        assert b.manifest.detector.threshold == -1.0  # every frame gets top_k hints, as the demo's do
        assert {"plugin", "baseline"} == set(r["end_to_end_ms"]) and "detector" in r["stages_ms"]
        assert "detector" not in r["baseline_stages_ms"]
