"""Phase 1 (``rtrt train embeddings``) on a tiny generated dataset with tiny random models.

Shows: the losses go down; W starts at the class means of the projected region features and
moves away from them; the bundle holds W, both projections, the detector's projection (the same
tensor), classes, synonyms, VFMSpec and provenance; resume after an interrupted epoch gives the
same W as an uninterrupted run; a 2-process torchrun run matches the 1-process run with the same
global batch within TORCHRUN_ATOL; every bad input is a one-line error with no output written.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rtrt.runtime import load_bundle
from rtrt.tools.cli import main as rtrt_main
from rtrt.trainer.cli import main as train_main
from rtrt.trainer.coda import CodaAnnotation, RegionItem, save_annotation
from rtrt.trainer.features import RegionFeatureExtractor
from fixtures.train_data import annotations_dir, make_dataset, phase1_args

# 1 vs 2 processes differ only in the order of floating-point sums (seen: ~1e-7 after 4 epochs).
TORCHRUN_ATOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("phase1")
    root = make_dataset(base / "data", n_images=8)
    work = base / "work"
    work.mkdir()
    out = base / "base"
    assert train_main(phase1_args(root, work, out)) == 0
    return root, work, out


def _epochs(metrics: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "epoch"]


def test_losses_go_down_and_w_leaves_its_class_mean_init(env, tmp_path):
    root, work, out = env
    epochs = _epochs(out.with_name("base.metrics.jsonl"))
    assert len(epochs) == 4
    for part in ("loss", "contrastive", "cls_regions", "cls_texts"):
        assert epochs[-1][part] < 0.6 * epochs[0][part], part

    # lr 0 and no EMA keep W at its initialisation: the class means of the normalised projected regions.
    init = tmp_path / "init"
    assert train_main(phase1_args(root, work, init, "--ema", "1", epochs=1) + ["--lr", "0"]) == 0
    b0 = load_bundle(init)
    w0 = b0.class_embeddings().weight.detach()
    spec = b0.manifest.vfm
    from rtrt.trainer.embeddings import collect_regions

    regions = collect_regions(annotations_dir(root), root, b0.class_names)
    feats, _ = RegionFeatureExtractor(spec, cache_dir=work / "cache").extract(regions.requests)
    feats = torch.cat(feats)
    labels = torch.tensor([c for ls in regions.labels for c in ls])
    proj = b0.detector().proj
    with torch.no_grad():
        z = F.normalize(proj(feats), dim=-1)
    means = torch.stack([z[labels == c].mean(0) for c in range(len(b0.class_names))])
    assert torch.allclose(w0, means, atol=1e-5)

    w = load_bundle(out).class_embeddings().weight.detach()
    assert (w - w0).norm() / w0.norm() > 0.1


def test_bundle_contents(env):
    root, work, out = env
    b = load_bundle(out)
    m = b.manifest
    assert m.class_names == ["barrier", "dog", "traffic_cone"]  # the synonyms file's classes
    assert {c.name: c.synonyms for c in m.classes}["traffic_cone"] == ["orange cone", "pylon"]
    assert m.d_llm == 64 and m.vfm.dim == 32 and m.vfm.ref == str(work / "vfm.safetensors")
    assert m.detector.d_vfm == 32 and m.detector.d_llm == 64 and m.adapter is None and m.vlm is None
    emb = b.tensors("embeddings.safetensors")
    assert set(emb) == {"W", "vfm_proj.net.0.weight", "vfm_proj.net.0.bias", "text_proj.net.0.weight", "text_proj.net.0.bias"}
    assert emb["text_proj.net.0.weight"].shape == (64, 32)
    det = b.tensors("detector.safetensors")
    assert torch.equal(det["proj.net.0.weight"], emb["vfm_proj.net.0.weight"])  # the detector reuses phase 1's projection
    training = m.training["embeddings"]
    assert training["regions_per_class"] == {"barrier": 5, "dog": 6, "traffic_cone": 5}
    assert training["config"]["epochs"] == 4 and len(training["history"]) == 4
    saved = json.loads((out.with_name("base.ckpt") / "config.json").read_text())
    assert saved == training["config"]
    steps = [r for r in map(json.loads, out.with_name("base.metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert len(steps) == 16 and all("loss" in r and "lr" in r for r in steps)
    # The bundle's detector scores patch tokens against its W.
    scores, _ = b.detector()(torch.randn(1, 16, 32), b.class_embeddings().weight)
    assert scores.shape == (1, 3)


class Interrupted(RuntimeError):
    pass


def test_resume_after_interrupted_epoch_gives_the_same_w(env, tmp_path, monkeypatch):
    root, work, base = env
    out = tmp_path / "resumed"
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # step 2 of epoch 3 (4 steps per epoch)
            raise Interrupted("power cut")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(Interrupted):
        train_main(phase1_args(root, work, out))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert not out.exists()  # no half-written bundle
    ckpt = torch.load(tmp_path / "resumed.ckpt" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1

    assert train_main(phase1_args(root, work, out, "--resume")) == 0
    a, b = load_bundle(base).tensors("embeddings.safetensors"), load_bundle(out).tensors("embeddings.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _epochs(tmp_path / "resumed.metrics.jsonl")[-1]["epoch"] == 3


def test_resume_refuses_other_settings(env, tmp_path, capsys):
    root, work, base = env
    out = tmp_path / "other"
    shutil.copytree(base.with_name("base.ckpt"), tmp_path / "other.ckpt")
    # --out differs from the checkpoint's
    _fails(capsys, phase1_args(root, work, out, "--resume"), "checkpoint was made with other settings (out:")
    assert not out.exists()


def test_torchrun_two_processes_match_one(env, tmp_path):
    root, work, base = env
    out = tmp_path / "ddp"
    # A fresh cache: the two ranks split the feature extraction between them.
    args = phase1_args(root, work, out) + ["--cache", str(tmp_path / "cache")]
    torchrun = Path(sys.executable).with_name("torchrun")
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "rtrt.trainer.cli", *args],
                         capture_output=True, text=True, env=env_vars, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    b = load_bundle(out)
    assert b.manifest.training["embeddings"]["world_size"] == 2
    one, two = load_bundle(base).tensors("embeddings.safetensors"), b.tensors("embeddings.safetensors")
    for k in one:
        diff = (one[k] - two[k]).abs().max().item()
        assert diff < TORCHRUN_ATOL, (k, diff)


def _fails(capsys, args, *needles):
    """Exit code 2 and the error as the last line of stderr (progress bars and warnings may precede it)."""
    assert rtrt_main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rtrt train: error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs_fail_in_one_line_without_output(env, tmp_path, capsys):
    root, work, base = env
    out = tmp_path / "out"
    # Output exists.
    _fails(capsys, phase1_args(root, work, base), "already exists", "--overwrite")
    # Unknown class, and a class without regions.
    _fails(capsys, phase1_args(root, work, out, "--classes", "traffic_cone,spaceship"), "unknown CODA-LM category 'spaceship'")
    _fails(capsys, phase1_args(root, work, out, "--classes", "traffic_cone,debris"), "class 'debris' has no regions")
    # A missing image: named; --skip-bad goes on without it and reports it.
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "train" / "images" / "0003.jpg").unlink()
    _fails(capsys, phase1_args(data, work, out), "0003.jpg: file not found")
    (data / "train" / "images" / "0005.jpg").write_bytes(b"\xff\xd8 truncated")
    assert rtrt_main(["train", *phase1_args(data, work, out, "--skip-bad", epochs=1)]) == 0
    skipped = load_bundle(out).manifest.training["embeddings"]["skipped_images"]
    assert len(skipped) == 2 and "0003.jpg" in skipped[0] and "0005.jpg" in skipped[1]
    shutil.rmtree(out)
    # Boxes outside the image or of zero area, and an unknown category in the data.
    ann_path = annotations_dir(data) / "train_0000.json"
    for region, needle in [
        (RegionItem("far away", (80, 50, 30, 20), "dog"), "outside the 96x64 image"),
        ({"description and explanation": "flat", "box": [10, 10, 0, 5], "category_name": "dog"}, "zero area"),
        ({"description and explanation": "odd", "box": [10, 10, 5, 5], "category_name": "spaceship"}, "unknown category 'spaceship'"),
    ]:
        if isinstance(region, RegionItem):
            save_annotation(ann_path, CodaAnnotation(region_perception=[region]))
        else:
            ann_path.write_text(json.dumps({"general_perception": {}, "region_perception": {"1": region}, "driving_suggestion": ""}))
        _fails(capsys, phase1_args(data, work, out, "--skip-bad"), needle)
    assert not out.exists()


def test_detection_cells_positives_hard_negatives_then_random():
    from rtrt.trainer.embeddings import detection_cells

    # 64x64 image, 4x4 grid of 16-px cells. A class-0 box over cells (0,0),(0,1); a tiny class-1 box
    # inside cell (3,3) whose centre no cell centre lies in; another object over cells (2,0),(2,1).
    boxes, labels = [(0, 0, 32, 16), (50, 50, 4, 4)], [0, 1]
    others = [(0, 32, 32, 16)]
    cells, labs = detection_cells((64, 64), 4, boxes, labels, others, negatives=5, seed=0)
    pos = {(c[1] // 16, c[0] // 16): l for c, l in zip(cells, labs) if l >= 0}
    assert pos == {(0, 0): 0, (0, 1): 0, (3, 3): 1}
    neg = [(c[1] // 16, c[0] // 16) for c, l in zip(cells, labs) if l < 0]
    assert len(neg) == 5 and len(set(neg)) == 5 and not set(neg) & set(pos)
    assert set(neg[:2]) == {(2, 0), (2, 1)}  # the other object's cells come first
    assert all(c[2] == 16 and c[3] == 16 for c in cells)
    again = detection_cells((64, 64), 4, boxes, labels, others, negatives=5, seed=0)
    assert again == (cells, labs)
    assert detection_cells((64, 64), 4, boxes, labels, others, negatives=5, seed=1)[0] != cells
    every, _ = detection_cells((64, 64), 4, boxes, labels, others, negatives=100, seed=0)
    assert len(every) == 16  # all cells: 3 positive, 13 negative


def test_detection_loss_trains_and_separates_cells(env, tmp_path):
    root, work, out = env
    on = tmp_path / "det"
    assert train_main(phase1_args(root, work, on, "--w-detection", "1.0", "--negatives-per-image", "8",
                                  "--threshold", "0.3", epochs=4)) == 0
    epochs = _epochs(on.with_name("det.metrics.jsonl"))
    assert "detection" in epochs[0] and "detection" not in _epochs(out.with_name("base.metrics.jsonl"))[0]
    assert epochs[-1]["detection"] < 0.8 * epochs[0]["detection"]
    cfg = json.loads((on / "manifest.json").read_text())["training"]["embeddings"]["config"]
    assert (cfg["w_detection"], cfg["negatives_per_image"]) == (1.0, 8)


def test_detection_flags_are_checked(env, tmp_path, capsys):
    root, work, _ = env
    bad = tmp_path / "bad"
    assert rtrt_main(["train", *phase1_args(root, work, bad, "--w-detection", "-1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--w-detection" in err[0] and not bad.exists()
