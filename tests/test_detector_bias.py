"""Detector-guided refinement and region questions' box (issue 14): ``detector_bias`` and ``region_box``.

Shows: the adapter's attention logits get exactly ``bias_scale`` x the given z-scores (zero bias is the
paper's attention, a large one picks its row, an untrained gate is still the identity), and the bias is
demanded by a biased adapter and refused by a plain one; ``token_bias`` is the calibrated detector's
z-score of the similarity sampled at each token cell (a region question's: the box cells' mean at every
token), ``box_cells`` / ``box_mask`` the cells in the box; the pipeline hands the adapter exactly those
for a general and a region question (the detector on the frame, the change only in the box); the
backends without a biased graph refuse it in one line; ``rtrt train adapter --detector-bias
--region-box`` writes both flags, changes a region question's tokens only in its box, learns the
bias scale, and refuses what it cannot honour.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rtrt.runtime.assets import default_bundle, example_images
from rtrt.runtime.backends import make_backend
from rtrt.runtime.bundle import load_bundle
from rtrt.runtime.detection import DetectorConfig
from rtrt.runtime.errors import BundleError, InputError, ModelMismatchError
from rtrt.runtime.image import load_image
from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.runtime.pipeline import REGION_QUESTION, Pipeline
from rtrt.runtime.refine_mask import (box_cells, box_mask, cell_centres, processor_geometry, sample_cells, token_bias,
                                      token_mask)

DEMO = default_bundle()
IMAGES = [str(p) for p in example_images()]


# ---------------------------------------------------------------------------------------------- module
def test_the_bias_enters_the_attention_logits_scaled():
    torch.manual_seed(0)
    biased = CrossAttentionAdapter(16, 8, 2, detector_bias=True)
    V, W = torch.randn(1, 5, 16), torch.randn(3, 16)
    zero = torch.zeros(1, 5, 3)
    assert torch.equal(biased(V, W, class_bias=zero), V)  # the gate starts closed: identity
    plain = CrossAttentionAdapter(16, 8, 2)
    plain.load_state_dict({k: v for k, v in biased.state_dict().items() if k != "bias_scale"})
    with torch.no_grad():
        for m in (plain, biased):
            m.gate.fill_(0.7)
    out0, att0 = biased(V, W, return_attention=True, class_bias=zero)
    outp, attp = plain(V, W, return_attention=True)
    assert torch.allclose(att0, attp) and torch.allclose(out0, outp)  # no bias: the paper's adapter
    bias = zero.clone()
    bias[0, 1, 2] = 50.0
    att = biased(V, W, return_attention=True, class_bias=bias)[1]
    assert (att[0, :, 1, 2] > 0.99).all()  # a strong z at one class: every head reads that row
    assert torch.allclose(att[0, :, [0, 2, 3, 4]], att0[0, :, [0, 2, 3, 4]])  # the other tokens as before
    # logits + scale * bias, checked against the softmax written out
    q = biased.q_proj(biased.norm_q(V)).unflatten(-1, (2, 4)).transpose(1, 2)
    k = biased.k_proj(biased.norm_kv(W)).unflatten(-1, (2, 4)).transpose(0, 1)
    with torch.no_grad():
        biased.bias_scale.fill_(0.3)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + 0.3 * bias[:, None], -1)
    assert torch.allclose(biased(V, W, return_attention=True, class_bias=bias)[1], want, atol=1e-6)
    with pytest.raises(ValueError, match="pass class_bias"):
        biased(V, W)
    with pytest.raises(ValueError, match="without detector_bias"):
        plain(V, W, class_bias=zero)
    again = CrossAttentionAdapter.from_config(biased.config)
    assert again.config.detector_bias and hasattr(again, "bias_scale") and not hasattr(plain, "bias_scale")


# ---------------------------------------------------------------------------------------------- cells
GEO = {"shortest_edge": None, "size": (20, 20), "crop": None}
CAL = DetectorConfig(d_vfm=4, d_llm=4, score_mean=[0.5, 0.2], score_std=[0.1, 0.2], z_threshold=1.0)


def test_box_cells_take_the_centres_inside_or_the_nearest():
    centres = cell_centres((20, 20), 2, GEO)  # (5, 5), (15, 5), (5, 15), (15, 15)
    assert box_cells((0, 0, 10, 10), (20, 20), centres).tolist() == [True, False, False, False]
    assert box_cells((5, 5, 15, 15), (20, 20), centres).all()  # edges count
    assert box_cells((11, 11, 13, 12), (20, 20), centres).tolist() == [False, False, False, True]  # between centres
    assert box_mask((0, 0, 10, 20), (20, 20), {"tokens_per_image": 5}, GEO).tolist() == [0, 1, 0, 1, 0]  # CLS first


def test_token_bias_is_the_calibrated_z_per_cell_or_the_boxs_mean():
    rng = np.random.default_rng(0)
    sim = rng.uniform(0, 1, (2, 3, 3)).astype(np.float32)
    layout = {"tokens_per_image": 5}
    cells = sample_cells(sim, (20, 20), cell_centres((20, 20), 2, GEO)).astype(np.float64)
    mean, std = np.array([0.5, 0.2]), np.array([0.1, 0.2])
    got = token_bias(sim, (20, 20), layout, GEO, CAL)
    assert got.shape == (5, 2) and got.dtype == np.float32 and (got[0] == 0).all()
    np.testing.assert_allclose(got[1:], (cells - mean) / std, rtol=1e-5, atol=1e-5)
    boxed = token_bias(sim, (20, 20), layout, GEO, CAL, box=(0, 0, 10, 20))  # the left column: cells 0 and 2
    want = (cells[[0, 2]].mean(0) - mean) / std
    np.testing.assert_allclose(boxed[1:], np.tile(want, (4, 1)), rtol=1e-5, atol=1e-5)
    assert (boxed[0] == 0).all()
    with pytest.raises(ModelMismatchError, match="calibrated detector"):
        token_bias(sim, (20, 20), layout, GEO, DetectorConfig(d_vfm=4, d_llm=4))
    with pytest.raises(ModelMismatchError, match=r"\[C, gh, gw\] map"):
        token_bias(np.zeros((2, 9), np.float32), (20, 20), layout, GEO, CAL)


# ---------------------------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def biased_bundle(tmp_path_factory):
    """The demo bundle with its adapter marked detector_bias + region_box and a bias scale of 2."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("biased") / "bundle"
    shutil.copytree(DEMO, root)
    b = load_bundle(root)
    state = {k: v.detach().clone() for k, v in b.adapter().state_dict().items()}
    state["bias_scale"] = torch.tensor(2.0)
    path = root.parent / "adapter.safetensors"
    save_file(state, str(path))
    b.manifest.adapter = dataclasses.replace(b.manifest.adapter, detector_bias=True, region_box=True)
    b.add_files({"adapter.safetensors": path})
    return root


def _spy(pipe, monkeypatch):
    seen = []

    def answer(pil, qs, hints, refine, new_tokens, timer, gen, mask=None, bias=None):
        seen.append((mask, bias))
        return ["x"] * len(pil)
    monkeypatch.setattr(pipe, "_answer", answer)
    return seen


def test_the_pipeline_hands_the_adapter_the_detectors_z_and_the_box(biased_bundle, monkeypatch):
    pipe = Pipeline.from_bundle(biased_bundle, backend="torch", vlm_backend="torch", max_new_tokens=4)
    assert pipe.refine_mask_z == 0.0  # the demo bundle's own mask for general questions
    frame = load_image(IMAGES[1])
    box = (100, 120, 220, 260)
    sim = pipe.detect(frame).similarity
    layout, geo = pipe.vlm.image_token_layout(), processor_geometry(pipe.vlm.processor.image_processor)
    seen = _spy(pipe, monkeypatch)
    pipe.batch([IMAGES[1], IMAGES[1]], ["Describe the objects.", REGION_QUESTION], regions=[None, box], hints=False, refine=True)
    (mask, bias), = seen
    per = int(layout["tokens_per_image"])
    general = token_mask(sim, frame.size, layout, geo, pipe.detector_cfg, 0.0)
    np.testing.assert_array_equal(mask, np.concatenate([general, box_mask(box, frame.size, layout, geo)]))
    np.testing.assert_array_equal(bias[:per], token_bias(sim, frame.size, layout, geo, pipe.detector_cfg))
    np.testing.assert_array_equal(bias[per:], token_bias(sim, frame.size, layout, geo, pipe.detector_cfg, box))
    np.testing.assert_array_equal(pipe.class_bias(IMAGES[1], region=box), bias[per:])
    np.testing.assert_array_equal(pipe.refine_mask(IMAGES[1], region=box), mask[per:])
    seen.clear()
    pipe.batch([IMAGES[1]], [REGION_QUESTION], regions=[box], hints=False, refine=False)
    assert seen == [(None, None)]  # no refinement: neither is computed
    monkeypatch.undo()
    # The real thing: the adapter gets that bias, and the tokens the VLM reads change in the box only.
    got, changed = [], []
    real_refine, real_generate = pipe.backend.refine, pipe.vlm.generate

    def refine(v, w, class_bias=None):
        got.append(class_bias)
        return real_refine(v, w, class_bias=class_bias)

    def generate(batch, transform=None, **kw):
        v = pipe.vlm.visual_tokens(batch)
        changed.append((transform(v) != v).any(-1).cpu().numpy())
        return real_generate(batch, transform=transform, **kw)
    monkeypatch.setattr(pipe.backend, "refine", refine)
    monkeypatch.setattr(pipe.vlm, "generate", generate)
    result = pipe(IMAGES[1], REGION_QUESTION, region=box, hints=False)
    assert torch.equal(got[0][0].cpu(), torch.from_numpy(bias[per:]))
    inside = box_mask(box, frame.size, layout, geo) > 0
    assert changed[0].any() and not changed[0][~inside].any()
    assert "class_bias" in result.timings_ms


@pytest.fixture(scope="module")
def stale_graphs(biased_bundle, tmp_path_factory):
    """The biased bundle with an adapter graph and a refined vision encoder exported without class_bias
    (as graphs exported before the adapter was trained with detector_bias are)."""
    from rtrt.export.onnx_export import export_adapter
    from rtrt.export.vlm_onnx import export_vision_encoder
    from rtrt.runtime.vlm import load_vlm

    root = tmp_path_factory.mktemp("stale") / "bundle"
    shutil.copytree(biased_bundle, root)
    b = load_bundle(root)
    plain = CrossAttentionAdapter.from_config(dataclasses.replace(b.manifest.adapter, detector_bias=False, region_box=False))
    plain.load_state_dict({k: v for k, v in b.adapter().state_dict().items() if k != "bias_scale"})
    work = root.parent
    export_adapter(plain, work / "adapter.onnx")
    W = b.class_embeddings().weight.detach()
    export_vision_encoder(load_vlm(str(root / "vlm")), work / "vision_encoder_refined.onnx", plain.eval(), W)
    b.add_files({"adapter.onnx": work / "adapter.onnx",
                 "vlm_onnx/onnx/vision_encoder_refined.onnx": work / "vision_encoder_refined.onnx"})
    return root


def _plain_bundle(tmp_path):
    """The demo bundle with its adapter as the paper's (no detector_bias, no region_box, no bias scale)."""
    from safetensors.torch import save_file

    root = tmp_path / "plain"
    shutil.copytree(DEMO, root)
    b = load_bundle(root)
    save_file({k: v.detach().clone() for k, v in b.adapter().state_dict().items() if k != "bias_scale"}, str(tmp_path / "a.safetensors"))
    b.manifest.adapter = dataclasses.replace(b.manifest.adapter, detector_bias=False, region_box=False)
    b.add_files({"adapter.safetensors": tmp_path / "a.safetensors"})
    return root


def test_graphs_exported_before_the_bias_are_refused_in_one_line(biased_bundle, stale_graphs, tmp_path):
    """Graphs exported without class_bias under a detector_bias adapter: each path says to re-export."""
    ort = Pipeline.from_bundle(stale_graphs, backend="ort", vlm_backend="torch", max_new_tokens=2)
    with pytest.raises(BundleError, match=r"exported adapter graph takes no class_bias .*re-export it with `rtrt export --bundle"):
        ort(IMAGES[0], hints=False)
    exported_vlm = Pipeline.from_bundle(stale_graphs, backend="torch", vlm_backend="ort", max_new_tokens=2)
    with pytest.raises(BundleError, match=r"refined vision encoder takes no class_bias; re-export it with `rtrt export --bundle .* --vlm`"):
        exported_vlm(IMAGES[0], hints=False)
    assert exported_vlm(IMAGES[0], hints=False, refine=False).answer  # without refinement nothing needs the bias
    torch_be = Pipeline.from_bundle(biased_bundle, backend="torch", load_vlm_model=False).backend
    m = load_bundle(biased_bundle).manifest
    v, c = np.zeros((1, 4, m.d_llm), np.float32), len(m.class_names)
    with pytest.raises(InputError, match="trained with detector_bias: pass class_bias"):
        torch_be.refine(v)
    with pytest.raises(InputError, match=rf"class_bias must be \[1, 4, {c}\]"):
        torch_be.refine(v, class_bias=np.zeros((1, 4, 3), np.float32))
    plain = Pipeline.from_bundle(_plain_bundle(tmp_path), backend="torch", load_vlm_model=False).backend
    with pytest.raises(InputError, match="without detector_bias"):
        plain.refine(v, class_bias=np.zeros((1, 4, c), np.float32))


def test_export_takes_the_bias_and_every_backend_answers_alike(biased_bundle, tmp_path):
    """``rtrt export --precision int8 --vlm`` of a detector_bias bundle: the adapter graphs and the refined
    vision encoder take class_bias, parity holds (``rtrt check``), and torch / ORT adapters and torch /
    exported VLMs give the same answers to general and region questions."""
    import onnxruntime

    from rtrt.runtime.check import check_backend, load_reference
    from rtrt.runtime.backends import make_backend
    from rtrt.tools.cli import main

    root = tmp_path / "bundle"
    shutil.copytree(biased_bundle, root)
    assert main(["export", "--bundle", str(root), "--precision", "int8", "--vlm"]) == 0
    for f in ("adapter.onnx", "adapter.int8.onnx", "vlm_onnx/onnx/vision_encoder_refined.onnx"):
        assert "class_bias" in [i.name for i in onnxruntime.InferenceSession(str(root / f)).get_inputs()], f
    b = load_bundle(root)
    reference = load_reference(b)
    assert "class_bias" in reference["adapter"]["feeds"]
    for backend, precision in (("ort", "fp32"), ("ort", "int8"), ("torch", "fp32")):
        rows = check_backend(make_backend(backend, b, precision=precision), reference, precision)
        assert rows and all(r.verdict == "pass" for r in rows), rows
    box = (100, 120, 220, 260)
    images, qs, regs = IMAGES[:2] * 2, ["Describe the objects on the road.", REGION_QUESTION] * 2, [None, box] * 2
    answers = {}
    for be, vb in (("torch", "torch"), ("ort", "torch"), ("ort", "ort")):
        pipe = Pipeline.from_bundle(root, backend=be, vlm_backend=vb, max_new_tokens=16)
        answers[be, vb] = [r.answer for r in pipe.batch(images, qs, regions=regs, hints=False, refine=True)]
    assert answers["ort", "torch"] == answers["torch", "torch"] == answers["ort", "ort"]
    plain = Pipeline.from_bundle(root, backend="torch", vlm_backend="torch", max_new_tokens=16)
    assert [r.answer for r in plain.batch(images, qs, regions=regs, hints=False, refine=False)] != answers["torch", "torch"]


# ---------------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny calibrated phase-1 bundle, a tiny LLaVA, and region questions laid out as CODA-LM's
    (``<split>/images_w_boxes/<id>_object_<k>.jpg`` beside ``<split>/images/`` and ``<split>_<id>.json``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fixtures.train_data import annotations_dir, llava_phase1, tasks_dir

    from rtrt.trainer.coda import TaskRecord, draw_region_box, iter_annotations, write_tasks

    base = tmp_path_factory.mktemp("bias_train")
    root, _, vlm, phase1 = llava_phase1(base, n_images=6)
    b = load_bundle(phase1)
    n = len(b.manifest.class_names)
    b.manifest.detector = dataclasses.replace(b.manifest.detector, score_mean=[0.5] * n, score_std=[0.2] * n, z_threshold=0.0)
    b.add_files({})
    split = annotations_dir(root)
    (split / "images").mkdir()
    (split / "images_w_boxes").mkdir()
    records, boxes = [], {}
    for i, (path, ann) in enumerate(iter_annotations(split)):
        image_id = path.stem.split("_", 1)[1]
        frame = Image.open(root / "train" / "images" / f"{image_id}.jpg").convert("RGB")
        frame.save(split / "images" / f"{image_id}.jpg", quality=95)
        x, y, w, h = ann.region_perception[1].box
        rel = f"CODA-LM/train/images_w_boxes/{image_id}_object_2.jpg"
        draw_region_box(frame, (x, y, w, h)).save(root / rel, quality=95)
        records.append(TaskRecord(i, rel, "Describe the object in the red box.", ann.region_perception[1].description_and_explanation))
        boxes[str(root / rel)] = (x, y, x + w, y + h)
    tasks = base / "tasks"
    tasks.mkdir()
    shutil.copy(tasks_dir(root) / "general_perception.jsonl", tasks)
    write_tasks(tasks / "region_perception.jsonl", records)
    return root, vlm, phase1, tasks, boxes


def _train_args(tiny, out, *extra, bundle=None):
    root, vlm, phase1, tasks, _ = tiny
    return ["adapter", "--bundle", str(bundle or phase1), "--vlm", str(vlm), "--tasks", str(tasks), "--images", str(root),
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--width", "32", "--heads", "4", "--device", "cpu",
            "--out", str(out), *extra]


def test_train_detector_bias_and_region_box(tiny, tmp_path, monkeypatch):
    from rtrt.runtime import vlm as vlm_module
    from rtrt.trainer import adapter as adapter_mod
    from rtrt.trainer.cli import main as train_main

    root, vlm_dir, phase1, _, boxes = tiny
    seen, biases = [], []
    real_loss, real_forward = adapter_mod.reconstruction_loss, CrossAttentionAdapter.forward
    loaded = []
    real_load = adapter_mod.load_image

    def load(path, *a, **k):
        loaded.append(str(path))
        return real_load(path, *a, **k)

    def spy(refined, tokens, mode):  # what the trainer's transform hands the VLM, beside its input, and whose
        seen.append((refined.detach().clone(), tokens.detach().clone(), list(loaded[-(tokens.shape[0] // per):])))
        return real_loss(refined, tokens, mode)

    def forward(self, v, w, return_attention=False, class_bias=None):
        biases.append(class_bias)
        return real_forward(self, v, w, return_attention, class_bias)
    family = vlm_module.load_vlm(vlm_dir)
    layout, geo = family.image_token_layout(), processor_geometry(family.processor.image_processor)
    per = int(layout["tokens_per_image"])
    monkeypatch.setattr(adapter_mod, "load_image", load)
    monkeypatch.setattr(adapter_mod, "reconstruction_loss", spy)
    monkeypatch.setattr(CrossAttentionAdapter, "forward", forward)
    out = tmp_path / "biased"
    assert train_main(_train_args(tiny, out, "--detector-bias", "--region-box")) == 0
    monkeypatch.undo()
    m = load_bundle(out).manifest
    assert m.adapter.detector_bias and m.adapter.region_box
    assert float(load_bundle(out).adapter().bias_scale.detach()) != 1.0  # the scale learned
    assert all(b is not None and b.shape[-1] == len(m.class_names) for b in biases)
    # The last step's tokens (the gate is open by then): a region question's change stays in its box, its bias is
    # the box's mean z on the frame without the red box.
    refined, tokens, paths = seen[-1]
    region_seen = False
    source = load_bundle(phase1)
    pipe = Pipeline(source, make_backend("torch", source))
    for j, path in enumerate(paths):
        changed = (refined[j * per:(j + 1) * per] != tokens[j * per:(j + 1) * per]).any(-1).numpy()
        if path in boxes:
            frame = load_image(path.replace("images_w_boxes", "images").replace("_object_2", ""))
            inside = box_mask(boxes[path], frame.size, layout, geo) > 0
            assert changed.any() and not changed[~inside].any()
            region_seen = True
            sim = pipe.detect(frame).similarity
            want = token_bias(sim, frame.size, layout, geo, load_bundle(phase1).manifest.detector, boxes[path])
            got = biases[-1][0, j * per:(j + 1) * per].numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert region_seen


def test_train_flags_refuse_what_they_cannot_honour(tiny, tmp_path, capsys):
    from rtrt.tools.cli import main as rtrt_main

    root, _, phase1, tasks, _ = tiny
    uncal = tmp_path / "uncal"
    shutil.copytree(phase1, uncal)
    b = load_bundle(uncal)
    b.manifest.detector = dataclasses.replace(b.manifest.detector, score_mean=None, score_std=None, z_threshold=None)
    b.add_files({})

    def fails(args, needle):
        assert rtrt_main(["train", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("rtrt train: error: ") and needle in err, err
    fails(_train_args(tiny, tmp_path / "x", "--detector-bias", bundle=uncal), "--detector-bias needs a calibrated detector")
    fails(_train_args(tiny, tmp_path / "x", "--detector-bias", "--null-slot"), "--detector-bias and --null-slot cannot be combined")
    gone = next((root / "CODA-LM" / "train").glob("train_*.json"))
    moved = gone.with_suffix(".bak")
    gone.rename(moved)
    try:
        fails(_train_args(tiny, tmp_path / "x", "--region-box"), "its annotation is missing")
    finally:
        moved.rename(gone)
