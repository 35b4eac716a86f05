"""Phase 2 (``rtrt train adapter``) on tiny random VLMs (``tests/fixtures/tiny_vlm.py``) and a tiny generated dataset.

Shows: the losses go down; every VLM parameter is bit-identical before and after training (hash
of the very model the trainer used); the adapter's gradient is non-zero while the VLM's is absent
(None), for every family; answers are the family's own assistant turn; bf16 + gradient
checkpointing run; the output bundle adds the adapter and the VLMSpec to phase 1's files; bad input
is a one-line error with no output written.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import rtrt.runtime.vlm as vlm_module
from rtrt.runtime import load_bundle
from rtrt.runtime.errors import InputError
from rtrt.runtime.image import load_image
from rtrt.runtime.modules import CrossAttentionAdapter
from rtrt.tools.cli import main as rtrt_main
from fixtures.tiny_vlm import build_tiny_vlm
from rtrt.trainer.adapter import answer_token_ids, append_answers
from rtrt.trainer.cli import main as train_main
from fixtures.train_data import make_dataset, phase1_args, tasks_dir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("phase2")
    root = make_dataset(base / "data", n_images=8)
    work = base / "work"
    work.mkdir()
    bundle = base / "phase1"
    assert train_main(phase1_args(root, work, bundle, epochs=1)) == 0
    return root, bundle, build_tiny_vlm("llava", work / "llava"), work


def _args(env, out, *extra, epochs=8):
    root, bundle, vlm, _ = env
    return ["adapter", "--bundle", str(bundle), "--vlm", str(vlm), "--tasks", str(tasks_dir(root)), "--images", str(root),
            "--task", "general_perception", "--epochs", str(epochs), "--batch-size", "4", "--lr", "1e-2",
            "--width", "32", "--heads", "4", "--device", "cpu", "--out", str(out), *extra]


def _hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def spy(monkeypatch):
    """Records the VLM the trainer loads and its hash at load time."""
    seen = {}
    real = vlm_module.load_vlm

    def load(*args, **kwargs):
        family = real(*args, **kwargs)
        seen["family"], seen["hash"] = family, _hash(family.model)
        return family

    monkeypatch.setattr(vlm_module, "load_vlm", load)
    return seen


def test_phase2_trains_only_the_adapter(env, tmp_path, spy):
    root, phase1, vlm_dir, _ = env
    out = tmp_path / "full"
    assert train_main(_args(env, out)) == 0
    model = spy["family"].model
    assert _hash(model) == spy["hash"]  # bit-identical after 8 epochs
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())

    epochs = [r for r in map(json.loads, (tmp_path / "full.metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.1
    assert epochs[-1]["autoregressive"] < epochs[0]["autoregressive"] - 0.1
    first = next(r for r in map(json.loads, (tmp_path / "full.metrics.jsonl").read_text().splitlines()) if r["kind"] == "step")
    assert first["reconstruction"] == 0.0  # the untrained adapter is the identity

    b, p1 = load_bundle(out), load_bundle(phase1)
    m = b.manifest
    assert m.vlm.family == "llava" and m.vlm.ref == str(vlm_dir.resolve()) and m.vlm.hidden_size == 64
    assert m.vlm.image_token_layout["tokens_per_image"] == 16
    assert m.adapter.d_model == 64 and m.adapter.width == 32 and m.adapter.heads == 4
    assert set(m.files) == {"embeddings.safetensors", "detector.safetensors", "adapter.safetensors"}
    for name in ("embeddings.safetensors", "detector.safetensors"):
        assert m.files[name].sha256 == p1.manifest.files[name].sha256
    assert set(m.training) == {"embeddings", "adapter"} and m.training["adapter"]["qa_pairs"] == 8
    adapter = b.adapter()
    assert adapter.gate.item() != 0.0
    assert m.class_names == p1.manifest.class_names


@pytest.fixture(scope="module", params=["llava", "qwen2_5_vl", "internvl"])
def family(request, tmp_path_factory):
    return vlm_module.load_vlm(build_tiny_vlm(request.param, tmp_path_factory.mktemp(request.param)))


def test_adapter_gets_gradients_and_the_vlm_none(env, family):
    root = env[0]
    images = [load_image(root / "train" / "images" / f"000{i}.jpg") for i in range(2)]
    questions = ["Describe the objects on the road.", "What should the ego car do?"]
    answers = ["There is a dog and a traffic cone.", "Slow down."]
    ids = [answer_token_ids(family, q, a, 64) for q, a in zip(questions, answers)]
    tok = family.processor.tokenizer
    assert tok.decode(ids[0], skip_special_tokens=True).strip() == answers[0]
    assert ids[0][-1] == tok.eos_token_id  # the model learns to stop
    batch, labels = append_answers(family.prepare(images, questions), ids, tok.pad_token_id)
    assert [int((row != -100).sum()) for row in labels] == [len(i) for i in ids]

    torch.manual_seed(0)
    adapter = CrossAttentionAdapter(family.hidden_size, width=32, heads=4)
    w = torch.randn(3, family.hidden_size)
    family.forward(batch, transform=lambda v: adapter(v[None], w)[0], labels=labels).loss.backward()
    assert all(p.grad is None for p in family.model.parameters())
    # At initialisation the gate is closed (tanh(0) = 0): only the gate gets a gradient ...
    assert adapter.gate.grad.abs().item() > 0
    # ... and once it opens, every adapter weight does.
    adapter.zero_grad()
    with torch.no_grad():
        adapter.gate.fill_(0.5)
    family.forward(batch, transform=lambda v: adapter(v[None], w)[0], labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in family.model.parameters())


def test_answer_logits_and_given_visual_tokens_change_no_gradient(env, family):
    # Phase 2 asks for the logits of the answer positions only (logits_to_keep) and, with
    # --cache-visual-tokens, gives the tower's output computed before: the adapter's gradients and the
    # loss are those of the full forward (the loss up to its summation order).
    root = env[0]
    images = [load_image(root / "train" / "images" / f"000{i}.jpg") for i in range(2)]
    questions = ["Describe the objects on the road.", "What should the ego car do?"]
    ids = [answer_token_ids(family, q, a, 64) for q, a in zip(questions, ["There is a dog.", "Slow down and stop."])]
    batch, labels = append_answers(family.prepare(images, questions), ids, family.processor.tokenizer.pad_token_id)
    keep = labels.shape[1] - int((labels != -100).any(0).nonzero().min()) + 1
    assert keep < labels.shape[1] // 2  # the prompt (image tokens included) is most of the sequence
    torch.manual_seed(0)
    adapter = CrossAttentionAdapter(family.hidden_size, width=32, heads=4)
    with torch.no_grad():
        adapter.gate.fill_(0.5)
    w = torch.randn(3, family.hidden_size)

    def run(**kw):
        adapter.zero_grad()
        out = family.forward(batch, transform=lambda v: adapter(v[None], w)[0], labels=labels, **kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in adapter.named_parameters()}

    full, g_full = run()
    part, g_part = run(logits_to_keep=keep, visual_tokens=family.visual_tokens(batch))
    assert part.logits.shape[1] == keep and full.logits.shape[1] == labels.shape[1]
    assert torch.equal(part.logits, full.logits[:, -keep:])
    torch.testing.assert_close(part.loss, full.loss, rtol=1e-6, atol=0)
    for n in g_full:
        torch.testing.assert_close(g_part[n], g_full[n], rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="leaves out labelled positions"):
        family.forward(batch, labels=labels, logits_to_keep=keep - 1)


def test_cached_visual_tokens_train_the_same_adapter(env, tmp_path, capsys):
    # Each image's tokens kept after its first step. The tiny tower's output depends on its batch by
    # float rounding (the demo VLM's does not on the AMD EPYC: byte for byte there), and the log says so.
    assert train_main(_args(env, tmp_path / "plain", epochs=3)) == 0
    assert train_main(_args(env, tmp_path / "cached", "--cache-visual-tokens", epochs=3)) == 0
    err = capsys.readouterr().err
    assert "--cache-visual-tokens: 8 images' visual tokens kept" in err
    assert ("bit for bit" in err) != ("depends on its batch here (max difference" in err)
    plain, cached = (load_bundle(tmp_path / n).adapter().state_dict() for n in ("plain", "cached"))
    for k in plain:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-2, atol=1e-3)  # rounding, grown over 24 steps at lr 1e-2
    # A resumed run may switch it (the weights do not depend on it).
    assert train_main(_args(env, tmp_path / "plain", "--resume", "--overwrite", "--cache-visual-tokens", epochs=3)) == 0


def test_bf16_and_gradient_checkpointing_replacing_the_input_bundle(env, tmp_path, spy, capsys):
    root, phase1, _, _ = env
    bundle = tmp_path / "bundle"
    shutil.copytree(phase1, bundle)
    w_before = load_bundle(bundle).tensors("embeddings.safetensors")["W"]
    args = _args(env, bundle, "--bf16", "--grad-checkpointing", epochs=1)
    args[args.index("--bundle") + 1] = str(bundle)
    assert rtrt_main(["train", *args]) == 2  # --out is --bundle: needs --overwrite
    assert "--out is the input bundle" in capsys.readouterr().err
    assert rtrt_main(["train", *args, "--overwrite"]) == 0
    model = spy["family"].model
    assert model.dtype == torch.bfloat16
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert _hash(model) == spy["hash"]
    b = load_bundle(bundle)
    assert b.has("adapter.safetensors") and torch.equal(b.tensors("embeddings.safetensors")["W"], w_before)
    assert b.adapter().gate.dtype == torch.float32


def _fails(capsys, args, *needles):
    assert rtrt_main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rtrt train: error: "), err
    for n in needles:
        assert n in err, err


def test_bad_inputs_fail_in_one_line_without_output(env, tmp_path, capsys):
    from fixtures import tiny_bundle

    root, _, _, _ = env
    out = tmp_path / "out"
    wide = tiny_bundle.make_tiny_bundle(tmp_path / "d32", d_llm=32)
    args = _args(env, out, epochs=1)
    args[args.index("--bundle") + 1] = str(wide)
    _fails(capsys, args, "hidden size 64, the bundle's W has 32")
    data = tmp_path / "data"
    shutil.copytree(root, data)
    (data / "train" / "images" / "0002.jpg").unlink()
    args = _args(env, out, epochs=1)
    args[args.index("--tasks") + 1], args[args.index("--images") + 1] = str(tasks_dir(data)), str(data)
    _fails(capsys, args, "0002.jpg: file not found", "--skip-bad")
    assert not out.exists()
    assert rtrt_main(["train", *args, "--skip-bad"]) == 0
    assert load_bundle(out).manifest.training["adapter"]["qa_pairs"] == 7
    # A task file without answers (CODA-LM's test split) cannot be trained on.
    task = tasks_dir(data) / "general_perception.jsonl"
    task.write_text("\n".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "answer"})
                              for line in task.read_text().splitlines()))
    _fails(capsys, args + ["--out", str(tmp_path / "out2")], "has no answer")
    assert not (tmp_path / "out2").exists()


def test_both_phases_on_the_procedural_world(env, tmp_path):
    """The trainers read what ``rtrt.tools.demo.world`` writes (CODA-LM layout, region images with boxes)."""
    from rtrt.tools.demo.world import WorldConfig, generate_world

    _, _, vlm, work = env
    root = tmp_path / "world"
    generate_world(WorldConfig(seed=1, pretrain=0, plugin=6, val=0, test=0, width=128, height=96), root, progress=False)
    args = phase1_args(root, work, tmp_path / "p1", "--carry-vfm", epochs=1)
    args[args.index("--annotations") + 1] = str(root / "CODA-LM" / "plugin")
    del args[args.index("--synonyms"):args.index("--synonyms") + 2]  # no synonyms: W's classes are the data's
    args[args.index("--d-llm"):args.index("--d-llm") + 2] = ["--vlm", str(vlm)]  # W's width read from the VLM's config
    assert train_main(args) == 0
    p1 = load_bundle(tmp_path / "p1")
    present = {r["category_name"] for f in (root / "CODA-LM" / "plugin").glob("*.json")
               for r in json.loads(f.read_text())["region_perception"].values()}
    assert p1.class_names == sorted(present) and p1.manifest.d_llm == 64
    assert p1.manifest.vfm.ref == "vfm" and p1.has("vfm/model.safetensors")
    assert train_main(["adapter", "--bundle", str(tmp_path / "p1"), "--vlm", str(vlm), "--tasks",
                       str(root / "CODA-LM" / "plugin" / "vqa_anno"), "--images", str(root), "--task", "region_perception",
                       "--max-answer-tokens", "16", "--epochs", "1", "--batch-size", "4", "--width", "32", "--heads", "4",
                       "--carry-vlm", "--device", "cpu", "--out", str(tmp_path / "p2")]) == 0
    p2 = load_bundle(tmp_path / "p2")
    assert p2.manifest.training["adapter"]["tasks"] == ["region_perception"]
    # Carried models load from inside the bundle.
    from rtrt.runtime.vfm import load_vfm

    assert p2.manifest.vlm.ref == "vlm" and vlm_module.load_vlm(p2.resolve_ref("vlm")).hidden_size == 64
    tokens = load_vfm(p2.manifest.vfm, p2.resolve_ref)(torch.zeros(1, 3, 64, 64))
    scores, _ = p2.detector()(tokens, p2.class_embeddings().weight)
    assert scores.shape == (1, len(p2.class_names))


def test_detector_hints_in_training_prompts(env, tmp_path, monkeypatch):
    """--hints detector: every prompt carries the bundle detector's names for its image, as Pipeline.detect finds them."""
    from rtrt.runtime.pipeline import Pipeline
    from rtrt.trainer import adapter as adapter_mod

    root, bundle, _, _ = env
    seen = []
    real = vlm_module.VLMFamily.prepare

    def prepare(self, images, questions, hints=None):
        seen.append(hints)
        return real(self, images, questions, hints)

    monkeypatch.setattr(vlm_module.VLMFamily, "prepare", prepare)
    calls = {}
    real_hints = adapter_mod._detector_hints

    def hints(source, pairs, d):
        calls["pairs"], calls["out"] = pairs, real_hints(source, pairs, d)
        return calls["out"]

    monkeypatch.setattr(adapter_mod, "_detector_hints", hints)
    out = tmp_path / "hinted"
    # threshold -1: the detector always names its top-k, so the prompts must carry them
    b = tmp_path / "p1"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["detector"]["threshold"] = -1.0
    (b / "manifest.json").write_text(json.dumps(m))
    args = _args(env, out, "--hints", "detector", epochs=1)
    args[args.index("--bundle") + 1] = str(b)
    assert train_main(args) == 0
    pipe = Pipeline.from_bundle(b, backend="torch", load_vlm_model=False)
    for pair, names in zip(calls["pairs"], calls["out"]):
        assert names and names == [d.name for d in pipe.detect(load_image(pair.image)).detections]
    assert seen and all(h is not None and all(h) for h in seen)
    cfg = load_bundle(out).manifest.training["adapter"]["config"]
    assert cfg["hints"] == "detector"


def test_hint_share_keeps_the_hint_in_a_seeded_share_of_the_prompts(env, tmp_path, monkeypatch):
    """--hint-share 0.5: some prompts carry the detector's hint, the others none, the same ones for the same seed."""
    root, bundle, _, _ = env
    seen = []
    real = vlm_module.VLMFamily.prepare

    def prepare(self, images, questions, hints=None):
        seen.extend(hints or [])
        return real(self, images, questions, hints)

    monkeypatch.setattr(vlm_module.VLMFamily, "prepare", prepare)
    b = tmp_path / "p1"
    shutil.copytree(bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["detector"]["threshold"] = -1.0  # the detector always names its top-k
    (b / "manifest.json").write_text(json.dumps(m))
    runs = []
    for name in ("a", "b"):
        seen.clear()
        args = _args(env, tmp_path / name, "--hints", "detector", "--hint-share", "0.5", epochs=1)
        args[args.index("--bundle") + 1] = str(b)
        assert train_main(args) == 0
        runs.append(sorted(bool(h) for h in seen))
    assert any(runs[0]) and not all(runs[0])  # with and without a hint
    assert runs[0] == runs[1]
    assert load_bundle(tmp_path / "a").manifest.training["adapter"]["config"]["hint_share"] == 0.5
    bad = _args(env, tmp_path / "c", "--hints", "detector", "--hint-share", "1.5", epochs=1)
    bad[bad.index("--bundle") + 1] = str(b)
    assert rtrt_main(["train", *bad]) == 2
    plain = _args(env, tmp_path / "d", "--hint-share", "0.5", epochs=1)  # no --hints detector: refused, not ignored
    assert rtrt_main(["train", *plain]) == 2


def test_null_slot_is_trained_stored_and_loaded(env, tmp_path):
    out = tmp_path / "null"
    assert train_main(_args(env, out, "--null-slot", epochs=2)) == 0
    b = load_bundle(out)
    assert b.manifest.adapter.null_slot is True
    assert b.manifest.training["adapter"]["config"]["null_slot"] is True
    adapter = b.adapter()  # strict load: the stored null_key fills the module's
    assert adapter.config.null_slot and adapter.null_key.abs().sum() > 0  # trained away from its zero start
    assert "null_slot" in json.loads((out / "manifest.json").read_text())["adapter"]
    assert b.manifest.adapter.slot_value is False and not hasattr(adapter, "null_value")
