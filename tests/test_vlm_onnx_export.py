"""Tests of the whole-VLM ONNX export (``rtrt export --vlm``, ``rtrt.export.vlm_onnx``) on tiny random VLMs.

For each family (LLaVA, Qwen2.5-VL, InternVL) one bundle is exported per session
(``fixtures.tiny_vlm_bundle``), then the graphs run in ONNX Runtime on a batch of two images of
different sizes (non-square: Qwen2.5-VL gets two different non-square grids, InternVL different tile
counts) with questions of different lengths, so the batch is left-padded. Checked against the torch
family: the prefill logits (past length 0), every decode step against the stock model with its own
``DynamicCache``, greedy tokens against ``VLMFamily.generate``, the refined encoder against the
adapter applied to the stock encoder's output, the int8 decoder, and the ``exports.vlm`` record.
The text models are initialised at 0.3 so a wrong position or cache shows in the logits.

Run: ``.venv/bin/pytest tests/test_vlm_onnx_export.py``
"""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from rtrt.export.cli import main as export_main
from rtrt.export.vlm_onnx import (QUANT_ACCURACY_LEVEL, QUANT_METHOD, DecoderGraph, decoder_dims, decoder_positions,
                                  greedy_decode, place_visual_tokens, token_ids, vision_feeds)
from rtrt.runtime.bundle import load_bundle
from rtrt.runtime.fileio import sha256_file
from rtrt.runtime.names import (DECODER, EMBED_TOKENS, VISION_ENCODER, VISION_ENCODER_REFINED, VLM_CONFIG_FILES,
                                VLM_DECODER_INPUTS, VLM_ONNX_DIR, VLM_REFINE_MASK, VLM_TOKENS_PER_ROW, past_names, vlm_onnx_file)
from rtrt.runtime.vlm import load_vlm
from fixtures.tiny_bundle import make_tiny_bundle
from fixtures.tiny_vlm_bundle import exported_vlm_bundle

FAMILIES = ("llava", "qwen2_5_vl", "internvl")
TOL = 1e-3  # fp32 logits (the bound); a correct export is at ~5e-5
STEPS = 6
SIZES = [(56, 112), (112, 84)]  # (height, width): Qwen grids [1, 4, 8] and [1, 8, 6]; InternVL 2 and 4 tiles (+ thumbnail)
QUESTIONS = ["What is in the image?", "Describe the scene on the road and the objects that influence the ego car"]


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, feeds):
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    """One family's exported bundle, its torch family, ORT sessions and one left-padded batch run through both."""
    bundle = load_bundle(exported_vlm_bundle(tmp_path_factory.getbasetemp(), request.param))
    fam = load_vlm(bundle.resolve_ref(bundle.manifest.vlm.ref), dtype=torch.float32)
    sessions = {f"{g}{'_' + v if v else ''}": _session(bundle.path(vlm_onnx_file(g, v)))
                for g, v in ((VISION_ENCODER, ""), (VISION_ENCODER_REFINED, ""), (EMBED_TOKENS, ""), (DECODER, ""), (DECODER, "quantized"))}
    adapter, W = bundle.adapter(), bundle.class_embeddings().weight.detach().float()
    batch = fam.prepare([_image(h, w, i) for i, (h, w) in enumerate(SIZES)], QUESTIONS)
    mask = batch["attention_mask"].numpy().astype(np.int64)
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 1  # one row is left-padded
    ids = batch["input_ids"].numpy().astype(np.int64)
    feeds = vision_feeds(fam, batch)
    stock = _run(sessions[VISION_ENCODER], feeds)[0]
    if request.param != "qwen2_5_vl":  # LLaVA's and InternVL's refined encoder takes the refinement mask
        feeds[VLM_REFINE_MASK] = np.ones(len(stock), np.float32)
    refined = _run(sessions[VISION_ENCODER_REFINED], feeds)[0]

    def embed(x):
        return sessions[EMBED_TOKENS].run(None, {"input_ids": np.asarray(x, np.int64)})[0]

    embeds = place_visual_tokens(embed(ids), ids, fam.image_token_id, refined)
    return SimpleNamespace(family=request.param, bundle=bundle, fam=fam, sessions=sessions, adapter=adapter, W=W, batch=batch,
                           mask=mask, ids=ids, stock=stock, refined=refined, embed=embed, embeds=embeds,
                           positions=decoder_positions(fam, batch), dims=decoder_dims(fam))


def _greedy(vlm, session):
    eos, pad = token_ids(vlm.fam)
    return greedy_decode(lambda feeds: _run(session, feeds), vlm.embed, vlm.embeds, vlm.mask, vlm.positions, vlm.dims,
                         max_new_tokens=STEPS, eos_token_ids=eos, pad_token_id=pad)


def _transform(vlm):
    return lambda v: vlm.adapter(v[None], vlm.W.to(v.dtype))[0]


def test_vision_encoders_match_torch_and_refined_is_the_adapter_on_stock(vlm):
    with torch.inference_mode():
        stock = vlm.fam.visual_tokens(vlm.batch)
        on_ort_stock = _transform(vlm)(torch.from_numpy(vlm.stock)).numpy()
    assert vlm.stock.shape == tuple(stock.shape) == (int((vlm.ids == vlm.fam.image_token_id).sum()), vlm.dims.hidden_size)
    assert np.abs(vlm.stock - stock.numpy()).max() < 1e-4
    assert np.abs(vlm.refined - on_ort_stock).max() < 1e-5
    assert np.abs(vlm.refined - vlm.stock).max() > 1e-2  # the adapter is open: refining changes the tokens


def test_one_image_and_one_token(vlm):
    """Batch sizes of 1 (the exports' examples had 2 and more): one image through both encoders, one token embedded."""
    batch = vlm.fam.prepare([_image(84, 56, 7)], QUESTIONS[:1])
    feeds = vision_feeds(vlm.fam, batch)
    with torch.inference_mode():
        stock = vlm.fam.visual_tokens(batch)
        refined = _transform(vlm)(stock).numpy()
        embedded = vlm.fam.model.get_input_embeddings()(torch.tensor([[vlm.fam.image_token_id]])).numpy()
    assert np.abs(_run(vlm.sessions[VISION_ENCODER], feeds)[0] - stock.numpy()).max() < 1e-4
    if vlm.family != "qwen2_5_vl":
        feeds[VLM_REFINE_MASK] = np.ones(len(stock), np.float32)
    assert np.abs(_run(vlm.sessions[VISION_ENCODER_REFINED], feeds)[0] - refined).max() < 1e-4
    assert np.array_equal(vlm.embed(np.array([[vlm.fam.image_token_id]])), embedded)


def test_refine_mask_input_keeps_the_stock_tokens_where_it_is_zero(vlm):
    """LLaVA's and InternVL's refined encoder: rows whose mask is 0 are the stock encoder's bit for bit, the
    others the refined ones; its length is images (tiles) times the tokens per row in the graph's metadata."""
    session = vlm.sessions[VISION_ENCODER_REFINED]
    names = [i.name for i in session.get_inputs()]
    if vlm.family == "qwen2_5_vl":
        assert VLM_REFINE_MASK not in names  # the mask serves LLaVA's fixed grid; Qwen's encoder is unchanged
        return
    feeds = vision_feeds(vlm.fam, vlm.batch)
    per = int(session.get_modelmeta().custom_metadata_map[VLM_TOKENS_PER_ROW])
    assert per * feeds["pixel_values"].shape[0] == len(vlm.stock)
    mask = (np.random.default_rng(3).random(len(vlm.stock)) < 0.4).astype(np.float32)
    got = session.run(None, {"pixel_values": feeds["pixel_values"], VLM_REFINE_MASK: mask})[0]
    on = mask > 0
    assert 0 < on.sum() < on.size
    assert np.array_equal(got[on], vlm.refined[on]) and np.array_equal(got[~on], vlm.stock[~on])
    assert vlm.bundle.manifest.exports.vlm.parity["max_abs_error"][f"{VISION_ENCODER_REFINED}.masked"] < TOL


def test_prefill_from_empty_past_matches_torch_forward(vlm):
    dec = vlm.sessions[DECODER]
    pasts, presents = past_names(vlm.dims.num_layers)
    empty = np.zeros((2, vlm.dims.num_kv_heads, 0, vlm.dims.head_dim), np.float32)
    out = _run(dec, {**dict(zip(VLM_DECODER_INPUTS, (vlm.embeds, vlm.mask, vlm.positions))), **{n: empty for n in pasts}})
    assert out[1].shape == (2, vlm.dims.num_kv_heads, vlm.mask.shape[1], vlm.dims.head_dim)  # present = the prompt
    with torch.inference_mode():
        ref = vlm.fam.forward(vlm.batch, _transform(vlm)).logits.numpy()
    valid = vlm.mask.astype(bool)
    assert np.isfinite(out[0][valid]).all()
    assert np.abs(out[0] - ref)[valid].max() < TOL


def test_decode_steps_match_the_stock_model_with_its_cache(vlm):
    from transformers import DynamicCache

    run = _greedy(vlm, vlm.sessions[DECODER])
    assert len(run.step_logits) >= 2
    model = vlm.fam.model
    cache = DynamicCache(config=model.config.get_text_config())
    mask, pos = torch.from_numpy(vlm.mask), torch.from_numpy(vlm.positions)
    embeds = torch.from_numpy(vlm.embeds)
    with torch.inference_mode():
        for step, logits in enumerate(run.step_logits):
            out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            assert np.abs(out.logits[:, -1].numpy() - logits).max() < TOL, f"step {step}"
            token = torch.from_numpy(run.tokens[:, step:step + 1])
            embeds = model.get_input_embeddings()(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[..., -1:] + 1


def test_greedy_tokens_equal_generate(vlm):
    run = _greedy(vlm, vlm.sessions[DECODER])
    with torch.inference_mode():
        ref = vlm.fam.generate(vlm.batch, _transform(vlm), max_new_tokens=STEPS).numpy()
    assert run.tokens.shape == ref.shape and (run.tokens == ref).all()


@pytest.mark.parametrize("batch,new,past", [(1, 1, 3), (1, 1, 0), (3, 2, 5)])
def test_decoder_shapes_other_than_the_example(vlm, batch, new, past):
    """Batch 1, one new token, an empty past: every size torch.export could not take as an example."""
    dims = vlm.dims
    rng = np.random.default_rng(batch * 10 + past)
    pasts, _ = past_names(dims.num_layers)
    positions = np.broadcast_to(np.arange(past, past + new), (batch, new)).astype(np.int64)
    if dims.position_rows == 3:
        positions = np.broadcast_to(positions, (3, batch, new)).copy()
    feeds = dict(zip(VLM_DECODER_INPUTS, (rng.standard_normal((batch, new, dims.hidden_size)).astype(np.float32),
                                          np.ones((batch, past + new), np.int64), positions)))
    feeds.update({n: rng.standard_normal((batch, dims.num_kv_heads, past, dims.head_dim)).astype(np.float32) for n in pasts})
    out = _run(vlm.sessions[DECODER], feeds)
    with torch.inference_mode():
        ref = DecoderGraph(vlm.fam).eval()(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in (*VLM_DECODER_INPUTS, *pasts)])
    assert out[0].shape == (batch, new, dims.vocab_size) and out[1].shape[2] == past + new
    for a, b in zip(out, ref):
        assert np.abs(a - b.numpy()).max() < TOL


def test_quantized_decoder_runs_with_int8_weights(vlm):
    run = _greedy(vlm, vlm.sessions[f"{DECODER}_quantized"])
    assert run.tokens.shape[0] == 2 and all(np.isfinite(s).all() for s in run.step_logits)
    fp32 = onnx.load(str(vlm.bundle.path(vlm_onnx_file(DECODER))))
    q = onnx.load(str(vlm.bundle.path(vlm_onnx_file(DECODER, "quantized"))))
    weights = {i.name for i in fp32.graph.initializer}
    weighted = [n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert len(weighted) >= 2 * vlm.dims.num_layers and len(nbits) == len(weighted)
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == QUANT_ACCURACY_LEVEL for n in nbits)
    agreement = vlm.bundle.manifest.exports.vlm.parity["quantized"]["token_agreement"]
    assert 0.0 <= agreement <= 1.0  # reported, not required


def test_record_describes_what_the_runtime_needs(vlm):
    b, fam, dims = vlm.bundle, vlm.fam, vlm.dims
    rec = b.manifest.exports.vlm
    eos, pad = token_ids(fam)
    assert (rec.family, rec.vlm_ref, rec.precision) == (vlm.family, b.manifest.vlm.ref, "int8")
    assert (rec.num_layers, rec.num_kv_heads, rec.head_dim, rec.hidden_size, rec.vocab_size, rec.position_rows) == (
        dims.num_layers, dims.num_kv_heads, dims.head_dim, dims.hidden_size, dims.vocab_size, 3 if vlm.family == "qwen2_5_vl" else 1)
    assert (rec.image_token_id, rec.eos_token_ids, rec.pad_token_id) == (fam.image_token_id, eos, pad)
    assert rec.context_length == fam.model.config.get_text_config().max_position_embeddings
    assert set(rec.graphs) == {VISION_ENCODER, VISION_ENCODER_REFINED, EMBED_TOKENS, DECODER, f"{DECODER}_quantized"}
    for key, g in rec.graphs.items():
        assert g.file in b.manifest.files and g.sha256 == b.manifest.files[g.file].sha256 == sha256_file(b.path(g.file))
        assert g.external_data is None and g.size == b.path(g.file).stat().st_size
    assert rec.graph(DECODER, "quantized").method == QUANT_METHOD
    pasts, presents = past_names(dims.num_layers)
    assert list(rec.graph(DECODER).inputs) == [*VLM_DECODER_INPUTS, *pasts]
    assert list(rec.graph(DECODER).outputs) == ["logits", *presents]
    assert rec.graph(DECODER).inputs["position_ids"][0] == (3 if vlm.family == "qwen2_5_vl" else "batch_size")
    assert {p.rsplit("/", 1)[1] for p in rec.config_files} <= set(VLM_CONFIG_FILES)
    assert f"{VLM_ONNX_DIR}/config.json" in rec.config_files and f"{VLM_ONNX_DIR}/tokenizer.json" in rec.config_files
    assert all(p in b.manifest.files for p in rec.config_files)
    parity = rec.parity
    assert parity["passed"] and parity["tokens_identical"] and parity["first_step_logits_error"] < TOL
    assert set(parity["max_abs_error"]) >= {VISION_ENCODER, VISION_ENCODER_REFINED, EMBED_TOKENS, f"{DECODER}.prefill_logits",
                                            f"{DECODER}.decode_logits"}
    # The bound is the tolerance times max(1, the torch output's largest magnitude), recorded per output.
    assert set(parity["scale"]) == set(parity["max_abs_error"]) | {"first_step_logits"}
    assert parity["scale"][f"{DECODER}.prefill_logits"] > 0 and parity["scale"][EMBED_TOKENS] > 0
    assert all(v <= parity["tolerance"] * max(1.0, parity["scale"][k]) for k, v in parity["max_abs_error"].items())


def test_weights_over_the_limit_go_to_external_data(tmp_path, tmp_path_factory, monkeypatch):
    """What a graph over 2 GB gets (the limit lowered to 0 here): its weights in ``<file>_data`` beside it, found by ORT."""
    from rtrt.export import vlm_onnx

    b = load_bundle(exported_vlm_bundle(tmp_path_factory.getbasetemp(), "llava"))
    fam = load_vlm(b.resolve_ref(b.manifest.vlm.ref), dtype=torch.float32)
    monkeypatch.setattr(vlm_onnx, "EXTERNAL_DATA_BYTES", 0)
    embed = vlm_onnx.export_embed_tokens(fam, tmp_path / "onnx" / "embed_tokens.onnx")
    quantized = vlm_onnx.quantize_decoder(b.path(vlm_onnx_file(DECODER)), tmp_path / "onnx" / "decoder_model_merged_quantized.onnx")
    for path in (embed, quantized):
        data = path.parent / f"{path.name}_data"
        assert data.is_file() and data.stat().st_size > path.stat().st_size  # the weights moved out
    ids = np.array([[1, 5, fam.image_token_id]], np.int64)
    with torch.inference_mode():
        ref = fam.model.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    assert np.array_equal(_session(embed).run(None, {"input_ids": ids})[0], ref)
    inputs = {i.name for i in _session(quantized).get_inputs()}
    assert inputs == set(VLM_DECODER_INPUTS) | set(past_names(decoder_dims(fam).num_layers)[0])
    assert vlm_onnx._with_data(tmp_path, "onnx/embed_tokens.onnx") == {  # what export_vlm hands to the bundle
        "onnx/embed_tokens.onnx": embed, "onnx/embed_tokens.onnx_data": embed.parent / "embed_tokens.onnx_data"}


def test_graphs_carry_no_stack_traces(vlm):
    for g in vlm.bundle.manifest.exports.vlm.graphs.values():
        model = onnx.load(str(vlm.bundle.path(g.file)))
        assert not any(n.metadata_props for n in model.graph.node), g.file


def test_plain_reexport_keeps_the_vlm_record(tmp_path, tmp_path_factory):
    src = exported_vlm_bundle(tmp_path_factory.getbasetemp(), "llava")
    copy = shutil.copytree(src, tmp_path / "b")
    before = load_bundle(copy).manifest.exports.vlm
    assert export_main(["--bundle", str(copy)]) == 0
    b = load_bundle(copy)
    assert b.manifest.exports.vlm == before and b.manifest.exports.graph("adapter") is not None


def test_a_vlm_parity_failure_writes_nothing(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """The real parity check with a bound no fp32 export meets; the graphs are the fixture's (not re-exported)."""
    from rtrt.export import vlm_onnx

    src = exported_vlm_bundle(tmp_path_factory.getbasetemp(), "llava")
    done = load_bundle(src)

    def copy_graphs(family, out_dir, **kwargs):
        files = {rel: out_dir / rel for rel in done.manifest.files if rel.startswith(f"{VLM_ONNX_DIR}/")}
        for rel, dst in files.items():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(done.path(rel), dst)
        return files

    monkeypatch.setattr(vlm_onnx, "export_vlm", copy_graphs)
    plain = tmp_path / "b"
    spec = done.manifest.vlm
    make_tiny_bundle(plain, d_llm=spec.hidden_size, vlm=spec, with_detector=False)
    before = (plain / "manifest.json").read_bytes()
    assert export_main(["--bundle", str(plain), "--vlm", "--vlm-tolerance", "1e-9"]) == 2
    err = capsys.readouterr().err
    assert "nothing was written" in err and f"vlm: {DECODER}.prefill_logits max abs error" in err and "1e-09 x max(1, max |torch|" in err
    assert (plain / "manifest.json").read_bytes() == before and not (plain / VLM_ONNX_DIR).exists()


def test_vlm_export_refusals(tmp_path, capsys):
    plain = make_tiny_bundle(tmp_path / "novlm", with_detector=False)
    assert export_main(["--bundle", str(plain), "--vlm"]) == 2
    assert "names no VLM" in capsys.readouterr().err
    assert export_main(["--bundle", str(plain), "--vlm", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16" in err and "fp32, int8" in err and err.count("\n") == 1
    assert load_bundle(plain).manifest.exports.onnx is None  # nothing written
