"""The trainers' recipe flags (issue 14, item 3) on the tiny fixtures: each changes what it says, the
defaults stay the paper's recipe, and every choice is recorded in the bundle's training record.

Phase 1: ``--w-init names`` starts W exactly at the class names' token embeddings in the VLM,
``--w-name-tie`` pulls W toward them. Phase 2: ``--recon relative`` scales each token's
reconstruction distance by its own norm; ``--attn-prior`` pulls the adapter's attention over W toward
the detector's per-patch similarity, sampled at LLaVA's token cells (geometry checked against the
probe's box-to-slot mapping).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import rtrt.runtime.vlm as vlm_module
from rtrt.runtime import load_bundle
from rtrt.runtime.image import load_image
from rtrt.tools.cli import main as rtrt_main
from rtrt.trainer import adapter as adapter_mod
from rtrt.trainer.cli import main as train_main, parse_args
from rtrt.trainer.name_embeddings import name_embeddings, name_token_ids
from fixtures.tiny_vlm import build_tiny_vlm
from fixtures.train_data import CLASSES, llava_phase1, phase1_args, tasks_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return llava_phase1(tmp_path_factory.mktemp("recipe"), n_images=8)


def _phase1(env, out, *extra, epochs=4):
    """Phase-1 flags with W's width read from the tiny LLaVA (--vlm instead of --d-llm)."""
    root, work, vlm, _ = env
    args = phase1_args(root, work, out, *extra, epochs=epochs)
    args[args.index("--d-llm"):args.index("--d-llm") + 2] = ["--vlm", str(vlm)]
    return args


def _phase2(env, out, *extra, bundle=None, epochs=4):
    root, _, vlm, phase1 = env
    return ["adapter", "--bundle", str(bundle or phase1), "--vlm", str(vlm), "--tasks", str(tasks_dir(root)),
            "--images", str(root), "--task", "general_perception", "--epochs", str(epochs), "--batch-size", "4",
            "--lr", "1e-2", "--width", "32", "--heads", "4", "--device", "cpu", "--out", str(out), *extra]


def _names(env) -> torch.Tensor:
    """The name embeddings in W's row order (the phase-1 bundles' classes)."""
    return name_embeddings(vlm_module.load_vlm(env[2]), load_bundle(env[3]).class_names)


def _name_cosine(bundle, names: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(load_bundle(bundle).class_embeddings().weight.detach(), names, dim=-1)


def _epochs(bundle) -> list[dict]:
    lines = (bundle.parent / f"{bundle.name}.metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def _fails(capsys, args, *needles):
    assert rtrt_main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rtrt train: error: "), err
    for n in needles:
        assert n in err, err


# ---------------------------------------------------------------------------------------------- phase 1
def test_defaults_are_the_papers_recipe(env):
    e = parse_args(["embeddings", "--annotations", "a", "--images", "i", "--d-llm", "8", "--vfm", "v", "--out", "o"])
    assert (e.w_init, e.w_name_tie) == ("regions", 0.0)
    a = parse_args(["adapter", "--bundle", "b", "--vlm", "v", "--tasks", "t", "--images", "i", "--out", "o"])
    assert (a.recon, a.attn_prior) == ("absolute", 0.0)
    # A default phase-1 run records them and loads no names (its W is not compared with them).
    p1 = load_bundle(env[3]).manifest.training["embeddings"]
    assert (p1["config"]["w_init"], p1["config"]["w_name_tie"], p1["config"]["vlm"]) == ("regions", 0.0, "")
    assert "w_name_cosine" not in p1


def test_name_embedding_is_the_mean_of_the_display_names_token_rows(env):
    vlm = vlm_module.load_vlm(env[2])
    tok = vlm.processor.tokenizer
    ids = name_token_ids(tok, "traffic_cone")
    assert tok.decode(ids) == " traffic cone"
    table = vlm.model.get_input_embeddings().weight.detach()
    assert torch.equal(name_embeddings(vlm, ["traffic_cone"])[0], table[ids].mean(0))


def test_w_init_names_starts_w_at_the_name_embeddings(env, tmp_path):
    names = _names(env)
    # Learning rate 0 and EMA off: W never moves, so the written W is exactly where it started.
    out = tmp_path / "frozen"
    assert train_main(_phase1(env, out, "--w-init", "names", "--lr", "0", "--ema", "1", epochs=1)) == 0
    b = load_bundle(out)
    assert torch.equal(b.class_embeddings().weight.detach(), names)
    record = b.manifest.training["embeddings"]
    assert record["config"]["w_init"] == "names" and record["config"]["vlm"] == str(env[2])
    assert b.class_names == load_bundle(env[3]).class_names and sorted(b.class_names) == sorted(CLASSES)
    assert record["w_name_cosine"] == {c: pytest.approx(1.0) for c in CLASSES}
    # The paper's start, the class means of the projected regions, is elsewhere.
    assert _name_cosine(env[3], names).abs().max() < 0.9
    # Training then moves W away from the names (nothing ties it there).
    moved = tmp_path / "moved"
    assert train_main(_phase1(env, moved, "--w-init", "names", epochs=1)) == 0
    assert 0.0 < load_bundle(moved).manifest.training["embeddings"]["w_moved"]


def test_w_name_tie_pulls_w_toward_the_names(env, tmp_path):
    names = _names(env)
    free, tied = tmp_path / "free", tmp_path / "tied"
    # A larger step than the fixture's, so 16 steps can move W far (the same for both runs).
    assert train_main(_phase1(env, free, "--lr", "3e-2", epochs=2)) == 0
    assert train_main(_phase1(env, tied, "--lr", "3e-2", "--w-name-tie", "5", epochs=2)) == 0
    assert _name_cosine(tied, names).mean() > _name_cosine(free, names).mean() + 0.3
    epochs = _epochs(tied)
    assert epochs[-1]["name_tie"] < epochs[0]["name_tie"]
    assert "name_tie" not in _epochs(free)[0]
    record = load_bundle(tied).manifest.training["embeddings"]
    assert record["config"]["w_name_tie"] == 5.0
    assert record["w_name_cosine"] == pytest.approx(dict(zip(load_bundle(tied).class_names, _name_cosine(tied, names).tolist())), abs=1e-6)


def test_name_flags_are_checked(env, tmp_path, capsys):
    out = tmp_path / "out"
    root, work, _, _ = env
    _fails(capsys, phase1_args(root, work, out, "--w-init", "names"), "--vlm")  # --d-llm only: no names to read
    _fails(capsys, phase1_args(root, work, out, "--w-name-tie", "1"), "--vlm")
    _fails(capsys, _phase1(env, out, "--w-name-tie", "-1"), "--w-name-tie must be >= 0")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- phase 2
def test_reconstruction_distances_by_hand():
    v = torch.tensor([[3.0, 4.0], [30.0, 40.0]])  # norms 5 and 50
    r = v + torch.tensor([[0.3, 0.4], [0.3, 0.4]])  # the same absolute change on both
    assert adapter_mod.reconstruction_loss(r, v, "absolute").item() == pytest.approx(0.25 / 2, rel=1e-5)
    # Relative: 0.25 / 25 and 0.25 / 2500, mean over tokens; the small token's change counts 100x more.
    assert adapter_mod.reconstruction_loss(r, v, "relative").item() == pytest.approx((0.01 + 0.0001) / 2, rel=1e-5)
    scaled = adapter_mod.reconstruction_loss(10 * r, 10 * v, "relative")
    assert scaled.item() == pytest.approx(adapter_mod.reconstruction_loss(r, v, "relative").item())


def test_recon_relative_is_the_loss_phase2_trains_with(env, tmp_path, monkeypatch):
    seen = []
    real = adapter_mod.reconstruction_loss

    def spy(refined, tokens, mode):
        value = real(refined, tokens, mode)
        seen.append((mode, value.item(), real(refined, tokens, "absolute").item()))
        return value

    monkeypatch.setattr(adapter_mod, "reconstruction_loss", spy)
    out = tmp_path / "relative"
    assert train_main(_phase2(env, out, "--recon", "relative", epochs=2)) == 0
    assert seen and all(mode == "relative" for mode, _, _ in seen)
    steps = [r for r in map(json.loads, (tmp_path / "relative.metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]
    assert [s["reconstruction"] for s in steps] == pytest.approx([v for _, v, _ in seen])
    assert any(rel != pytest.approx(ab) for _, rel, ab in seen if ab > 0)  # not the absolute distance
    assert load_bundle(out).manifest.training["adapter"]["config"]["recon"] == "relative"


def test_llava_cell_centres_agree_with_the_probes_box_slots():
    from transformers import CLIPImageProcessor

    from rtrt.tools.demo.probe import box_slots

    # A 200 x 100 image: shortest edge to 100 (no change), centre crop 100 x 100 keeps 50 <= x < 150.
    proc = CLIPImageProcessor(size={"shortest_edge": 100}, crop_size={"height": 100, "width": 100})
    centres = adapter_mod.llava_cell_centres((200, 100), 4, proc)
    assert centres[0].tolist() == pytest.approx([50 + 12.5, 12.5]) and centres[15].tolist() == pytest.approx([150 - 12.5, 87.5])
    for k, (x, y) in enumerate(centres.tolist()):  # a one-pixel box at each centre lies in exactly that slot
        assert box_slots((x - 0.5, y - 0.5, 1.0, 1.0), (200, 100), 4, proc) == [k]
    # Resize without crop: a 64 x 32 image squeezed to 32 x 32 (height x width).
    plain = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    assert adapter_mod.llava_cell_centres((64, 32), 2, plain).tolist() == [[16, 8], [48, 8], [16, 24], [48, 24]]


def test_attention_prior_follows_the_detectors_map():
    # Two classes on a 2 x 2 VFM grid over a 100 x 100 image: class 0 on the left column, class 1 on the right.
    sim = torch.tensor([[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.1, 0.9]]])
    centres = torch.tensor([[25.0, 25.0], [75.0, 75.0], [50.0, 10.0]])
    prior = adapter_mod.attention_prior(sim.numpy(), (100, 100), centres, temperature=0.05)
    assert prior.shape == (3, 2) and torch.allclose(prior.sum(-1), torch.ones(3))
    assert prior[0, 0] > 0.99 and prior[1, 1] > 0.99  # patch centres: that patch's class
    assert prior[2].tolist() == pytest.approx([0.5, 0.5])  # on the border: both equally
    assert adapter_mod.attention_prior(sim.numpy(), (100, 100), centres, temperature=10.0)[0, 0] < 0.6  # soft
    p = torch.tensor([[0.7, 0.3]])
    assert adapter_mod.prior_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert adapter_mod.prior_kl(p, torch.tensor([[0.3, 0.7]])).item() == pytest.approx(0.4 * math.log(0.7 / 0.3))


def _prior_divergences(env, *bundles) -> list[float]:
    """Per bundle, the mean KL(prior || head-averaged attention) of its adapter over the training images' tokens."""
    from rtrt.runtime.pipeline import Pipeline

    root, _, vlm_dir, phase1 = env
    vlm = vlm_module.load_vlm(vlm_dir)
    pipe = Pipeline.from_bundle(phase1, backend="torch", load_vlm_model=False)
    priors, tokens = [], []
    for path in sorted((root / "train" / "images").glob("*.jpg")):
        image = load_image(path)
        centres = adapter_mod.llava_cell_centres(image.size, 4, vlm.processor.image_processor)
        priors.append(adapter_mod.attention_prior(pipe.detect(image).similarity, image.size, centres, 0.05))
        with torch.no_grad():
            tokens.append(vlm.visual_tokens(vlm.prepare([image], ["Describe the objects on the road."])))
    out = []
    for bundle in bundles:
        b = load_bundle(bundle)
        adapter, w = b.adapter().eval(), b.class_embeddings().weight.detach()
        with torch.no_grad():
            kls = [adapter_mod.prior_kl(p, adapter(t[None], w, return_attention=True)[1][0].mean(0)).item()
                   for p, t in zip(priors, tokens)]
        out.append(sum(kls) / len(kls))
    return out


def test_attn_prior_pulls_the_adapters_attention_toward_the_detector(env, tmp_path):
    free, guided = tmp_path / "free", tmp_path / "guided"
    assert train_main(_phase2(env, free, epochs=2)) == 0
    assert train_main(_phase2(env, guided, "--attn-prior", "5", epochs=2)) == 0
    guided_kl, free_kl = _prior_divergences(env, guided, free)
    assert guided_kl < 0.5 * free_kl
    epochs = _epochs(guided)
    assert epochs[-1]["attn_prior"] < epochs[0]["attn_prior"]
    assert "attn_prior" not in _epochs(free)[0]
    cfg = load_bundle(guided).manifest.training["adapter"]["config"]
    assert (cfg["attn_prior"], cfg["attn_prior_temperature"], cfg["recon"]) == (5.0, 0.05, "absolute")


def test_slot_value_trains_with_the_prior_on_the_rows_share(env, tmp_path):
    out = tmp_path / "slot"
    assert train_main(_phase2(env, out, "--null-slot", "--slot-value", "--attn-prior", "5", epochs=2)) == 0
    b = load_bundle(out)
    assert (b.manifest.adapter.null_slot, b.manifest.adapter.slot_value) == (True, True)
    cfg = b.manifest.training["adapter"]["config"]
    assert (cfg["null_slot"], cfg["slot_value"], cfg["attn_prior"]) == (True, True, 5.0)
    adapter = b.adapter()  # strict load: the stored slot value fills the module's
    assert adapter.null_value.abs().sum() > 0  # trained away from its zero start
    epochs = _epochs(out)
    assert epochs[-1]["attn_prior"] < epochs[0]["attn_prior"]
    # The prior is held against the rows' share renormalised: the slot keeps a share of its own.
    w = b.class_embeddings().weight.detach()
    with torch.no_grad():
        _, attn = adapter(torch.randn(1, 7, w.shape[1]), w, return_attention=True)
    assert (attn.sum(-1) < 1).all()


@pytest.mark.parametrize("flag", ["--attn-prior", "--w-keep"])
def test_detector_cell_options_need_llava_and_sane_values(env, tmp_path, capsys, flag):
    out = tmp_path / "out"
    qwen = build_tiny_vlm("qwen2_5_vl", tmp_path / "qwen")
    args = _phase2(env, out, flag, "1", epochs=1)
    args[args.index("--vlm") + 1] = str(qwen)
    _fails(capsys, args, f"{flag} needs LLaVA's fixed image-token grid", "qwen2_5_vl")
    _fails(capsys, _phase2(env, out, flag, "-1", epochs=1), f"{flag} must be >= 0")
    if flag == "--attn-prior":
        _fails(capsys, _phase2(env, out, flag, "1", "--attn-prior-temperature", "0", epochs=1), "temperature > 0")
    assert not out.exists()


def test_keep_cells_and_masked_reconstruction():
    from rtrt.runtime.detection import DetectorConfig

    cells = torch.tensor([[0.9, 0.1], [0.2, 0.2], [0.1, 0.65]])  # [N=3 cells, C=2]
    raw = DetectorConfig(d_vfm=4, d_llm=4, threshold=0.5)
    assert adapter_mod.keep_cells(cells, raw).tolist() == [False, True, False]
    # Calibrated: per-class z-scores against z_threshold (class 1's mean 0.5, std 0.1: 0.65 is z 1.5).
    cal = DetectorConfig(d_vfm=4, d_llm=4, score_mean=[0.5, 0.5], score_std=[0.1, 0.1], z_threshold=2.0)
    assert adapter_mod.keep_cells(cells, cal).tolist() == [False, True, True]
    assert adapter_mod.keep_cells(cells, cal, z=0.0).tolist() == [False, True, False]  # --keep-z
    assert adapter_mod.keep_cells(cells, raw, z=0.0).tolist() == [False, True, False]  # uncalibrated: its raw threshold
    v = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    r = v + torch.tensor([[0.0, 5.0], [0.5, 0.0], [0.0, 0.0]])
    keep = torch.tensor([False, True, True])
    assert adapter_mod.masked_reconstruction(r, v, keep).item() == pytest.approx((0.25 + 0.0) / 2)
    assert adapter_mod.masked_reconstruction(r, v, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def _kept_change(env, *bundles) -> list[float]:
    """Per bundle, the mean relative change its adapter makes at the training images' kept token cells."""
    from rtrt.runtime.pipeline import Pipeline

    root, _, vlm_dir, phase1 = env
    vlm = vlm_module.load_vlm(vlm_dir)
    pipe = Pipeline.from_bundle(phase1, backend="torch", load_vlm_model=False)
    det = load_bundle(phase1).manifest.detector
    keeps, tokens = [], []
    for path in sorted((root / "train" / "images").glob("*.jpg")):
        image = load_image(path)
        centres = adapter_mod.llava_cell_centres(image.size, 4, vlm.processor.image_processor)
        keeps.append(adapter_mod.keep_cells(adapter_mod.sample_cells(pipe.detect(image).similarity, image.size, centres), det))
        with torch.no_grad():
            tokens.append(vlm.visual_tokens(vlm.prepare([image], ["Describe the objects on the road."])))
    assert 0 < sum(int(k.sum()) for k in keeps) < sum(k.numel() for k in keeps)  # both kinds of cell occur
    out = []
    for bundle in bundles:
        b = load_bundle(bundle)
        adapter, w = b.adapter().eval(), b.class_embeddings().weight.detach()
        with torch.no_grad():
            out.append(sum(adapter_mod.masked_reconstruction(adapter(t[None], w)[0], t, k).item()
                           for k, t in zip(keeps, tokens)) / len(tokens))
    return out


def test_w_keep_holds_the_tokens_the_detector_leaves(env, tmp_path):
    free, kept = tmp_path / "free", tmp_path / "kept"
    assert train_main(_phase2(env, free, "--null-slot", epochs=2)) == 0
    assert train_main(_phase2(env, kept, "--null-slot", "--w-keep", "1000", epochs=2)) == 0
    kept_change, free_change = _kept_change(env, kept, free)
    assert kept_change < 0.5 * free_change
    assert "keep" in _epochs(kept)[0] and "keep" not in _epochs(free)[0]
    assert load_bundle(kept).manifest.training["adapter"]["config"]["w_keep"] == 1000.0


def test_keep_and_null_slot_options_refuse_what_they_cannot_honour(env, tmp_path, capsys):
    out = tmp_path / "out"
    _fails(capsys, _phase2(env, out, "--keep-z", "0", epochs=1), "--keep-z needs --w-keep")
    _fails(capsys, _phase2(env, out, "--w-keep", "1", "--keep-z", "nan", epochs=1), "--keep-z needs --w-keep and a finite value")
    _fails(capsys, _phase2(env, out, "--w-keep", "nan", epochs=1), "--w-keep must be >= 0")
    _fails(capsys, _phase2(env, out, "--slot-value", epochs=1), "--slot-value needs --null-slot")
    assert not out.exists()


def test_resume_reads_a_field_missing_from_an_older_checkpoint_as_its_default(tmp_path):
    from rtrt.runtime.errors import InputError
    from rtrt.trainer import loop

    defaults = loop.config_defaults(adapter_mod.AdapterTrainConfig)
    assert defaults["null_slot"] is False and defaults["w_keep"] == 0.0 and defaults["keep_z"] is None
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    torch.save({"epoch": 1}, ckpt_dir / "last.pt")
    (ckpt_dir / "config.json").write_text(json.dumps({"epochs": 3}))  # written before null_slot existed
    assert loop.Checkpoint(ckpt_dir, {"epochs": 3, "null_slot": False}, defaults=defaults).load() == {"epoch": 1}
    changed = loop.Checkpoint(ckpt_dir, {"epochs": 3, "null_slot": True}, defaults=defaults)
    with pytest.raises(InputError, match="other settings \\(null_slot: False now True\\)"):
        changed.load()


def _calibrated_copy(env, out, z=0.0):
    """The tiny phase-1 bundle with a calibration (mean 0.5, std 0.2 per class, threshold z)."""
    import dataclasses
    import shutil

    shutil.copytree(env[3], out)
    b = load_bundle(out)
    n = len(b.manifest.class_names)
    b.manifest.detector = dataclasses.replace(b.manifest.detector, score_mean=[0.5] * n, score_std=[0.2] * n, z_threshold=z)
    b.add_files({})
    return out


def test_refine_mask_z_in_training_changes_only_the_detectors_cells(env, tmp_path, monkeypatch, capsys):
    bundle = _calibrated_copy(env, tmp_path / "calibrated")
    seen = []
    real = adapter_mod.reconstruction_loss

    def spy(refined, tokens, mode):  # what the trainer's transform hands the VLM, beside its input
        seen.append((refined.detach().clone(), tokens.detach().clone()))
        return real(refined, tokens, mode)

    monkeypatch.setattr(adapter_mod, "reconstruction_loss", spy)
    assert train_main(_phase2(env, tmp_path / "free", bundle=bundle, epochs=2)) == 0
    free = (seen[-1][0] != seen[-1][1]).any(-1)  # the last step's tokens: the gate is open by then
    seen.clear()
    out = tmp_path / "masked"
    assert train_main(_phase2(env, out, "--refine-mask-z", "0", bundle=bundle, epochs=2)) == 0
    assert load_bundle(out).manifest.training["adapter"]["config"]["refine_mask_z"] == 0.0
    masked = (seen[-1][0] != seen[-1][1]).any(-1)
    assert free.all()  # unmasked, every token is refined
    assert masked.any() and not masked.all()  # masked, some are, the others reach the VLM as they were
    monkeypatch.undo()
    _fails(capsys, _phase2(env, tmp_path / "x", "--refine-mask-z", "0", epochs=1), "--refine-mask-z needs a calibrated detector")
    _fails(capsys, _phase2(env, tmp_path / "x", "--refine-mask-z", "nan", bundle=bundle, epochs=1), "--refine-mask-z must be a finite number")


def test_hint_share_zero_skips_the_detector_and_trains_the_same(env, tmp_path, monkeypatch):
    """``--hints detector --hint-share 0`` (the demo's phase 2) drops every hint: it runs no detector pass and
    trains the very adapter a share that keeps none by its draw (1e-12) trains after that pass."""
    real = adapter_mod._detector_hints
    calls = []

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(adapter_mod, "_detector_hints", spy)
    zero, tiny_share = tmp_path / "zero", tmp_path / "tiny"
    assert train_main(_phase2(env, zero, "--hints", "detector", "--hint-share", "0", epochs=1)) == 0
    assert calls == []
    assert train_main(_phase2(env, tiny_share, "--hints", "detector", "--hint-share", "1e-12", epochs=1)) == 0
    assert calls == [1]
    assert (zero / "adapter.safetensors").read_bytes() == (tiny_share / "adapter.safetensors").read_bytes()
