"""Plug-in modules: identity at initialisation, dynamic shapes, detector maths (issue 2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rtrt.runtime import ClassEmbeddings, CrossAttentionAdapter, RareObjectDetector, select_detections


@pytest.mark.parametrize("B,N,C", [(1, 1, 1), (2, 7, 3), (3, 576, 32)])
def test_untrained_adapter_is_exact_identity(B, N, C):
    torch.manual_seed(0)
    ad = CrossAttentionAdapter(64, 32, 4)
    v = torch.randn(B, N, 64) * 10
    assert torch.equal(ad(v, torch.randn(C, 64)), v)
    assert torch.equal(ad(v.bfloat16(), torch.randn(C, 64)), v.bfloat16())


def test_adapter_gate_opens_and_is_tokenwise():
    torch.manual_seed(0)
    ad = CrossAttentionAdapter(64, 32, 4)
    with torch.no_grad():
        ad.gate.fill_(1.0)
    v, w = torch.randn(2, 5, 64), torch.randn(6, 64)
    out = ad(v, w)
    assert out.shape == v.shape and not torch.allclose(out, v)
    # each visual token attends only to W: the same tokens flattened into one row give the same result
    flat = ad(v.reshape(1, 10, 64), w).reshape(2, 5, 64)
    torch.testing.assert_close(out, flat, rtol=1e-5, atol=1e-5)
    # the reference: explicit multi-head attention
    q = ad.q_proj(ad.norm_q(v)).view(2, 5, 4, 8).transpose(1, 2)
    kv = ad.norm_kv(w)
    k = ad.k_proj(kv).view(6, 4, 8).transpose(0, 1)
    val = ad.v_proj(kv).view(6, 4, 8).transpose(0, 1)
    ref = F.scaled_dot_product_attention(q, k.expand(2, -1, -1, -1), val.expand(2, -1, -1, -1))
    ref = v + torch.tanh(ad.gate) * ad.out_proj(ref.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_adapter_gradients_flow_to_gate_first():
    ad = CrossAttentionAdapter(16, 8, 2)
    v, w = torch.randn(1, 3, 16), torch.randn(2, 16, requires_grad=True)
    ad(v, w).pow(2).sum().backward()
    assert ad.gate.grad is not None and ad.gate.grad.abs() > 0


def test_adapter_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionAdapter(16, 10, 3)


def test_detector_scores_are_max_cosine():
    torch.manual_seed(0)
    det = RareObjectDetector(8, 16)
    w = torch.randn(3, 16)
    patches = torch.randn(2, 5, 8)
    scores, sim = det(patches, w)
    assert scores.shape == (2, 3) and sim.shape == (2, 3, 5)
    z = det.proj(patches)
    ref = F.cosine_similarity(z[:, None, :, :], w[None, :, None, :], dim=-1)
    torch.testing.assert_close(sim, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, ref.amax(-1))
    # a patch equal (after projection) to a class row scores 1 for that class
    with torch.no_grad():
        det.proj.net[0].weight.zero_()
        det.proj.net[0].bias.copy_(w[1])
    scores, _ = det(patches, w)
    assert scores[0, 1].item() == pytest.approx(1.0, abs=1e-6)


def test_select_detections_topk_threshold_and_ties():
    names = ["a", "b", "c", "d"]
    got = select_detections(torch.tensor([0.2, 0.9, 0.5, 0.9]), names, top_k=2, threshold=0.3)
    assert [(d.name, round(d.score, 3)) for d in got] == [("b", 0.9), ("d", 0.9)]
    assert [d.name for d in select_detections([0.2, 0.9, 0.5, 0.1], names, 5, 0.3)] == ["b", "c"]
    assert select_detections([0.1] * 4, names, 5, 0.3) == []
    with pytest.raises(ValueError):
        select_detections([0.1], names, 5, 0.3)


def test_class_embeddings_validation():
    with pytest.raises(ValueError, match="at least one"):
        ClassEmbeddings([], 4)
    with pytest.raises(ValueError, match="unique"):
        ClassEmbeddings(["a", "a"], 4)
    with pytest.raises(ValueError, match="shape"):
        ClassEmbeddings(["a"], 4, weight=torch.zeros(2, 4))
    ce = ClassEmbeddings(["a", "b"], 4, synonyms={"a": ["x"]})
    assert ce.synonyms == {"a": ["x"], "b": []} and ce().shape == (2, 4)


def _null_reference(ad, v, w):
    """The null slot written the plain way: one more key per head (the learned one) whose value is zero
    (with ``slot_value``, the learned one)."""
    h, dh = ad.heads, ad.head_dim
    q = ad.q_proj(ad.norm_q(v)).unflatten(-1, (h, dh)).transpose(1, 2)
    kv = ad.norm_kv(w)
    k = torch.cat([ad.k_proj(kv).unflatten(-1, (h, dh)).transpose(0, 1), ad.null_key[:, None]], 1)
    slot = ad.null_value[:, None] if ad.config.slot_value else torch.zeros(h, 1, dh)
    val = torch.cat([ad.v_proj(kv).unflatten(-1, (h, dh)).transpose(0, 1), slot], 1)
    attn = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)
    return v + torch.tanh(ad.gate) * ad.out_proj((attn @ val).transpose(1, 2).flatten(2)), attn


def test_adapter_null_slot_is_a_zero_value_key():
    torch.manual_seed(0)
    ad = CrossAttentionAdapter(64, 32, 4, null_slot=True)
    assert ad.config.null_slot and ad.null_key.shape == (4, 8)
    v, w = torch.randn(2, 5, 64), torch.randn(6, 64)
    assert torch.equal(ad(v, w), v)  # still the identity before training
    with torch.no_grad():
        ad.gate.fill_(1.0)
        ad.null_key.normal_()
    out, attn = ad(v, w, return_attention=True)
    ref, ref_attn = _null_reference(ad, v, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, ref_attn[..., :6], rtol=1e-6, atol=1e-6)
    assert attn.shape == (2, 4, 5, 6) and (attn.sum(-1) < 1).all()  # the rest is the null slot's
    # A token whose queries all pick the null slot gets only out_proj's bias: the classes' values do not reach it.
    with torch.no_grad():
        ad.out_proj.bias.zero_()
        ad.null_key.copy_(1e4 * ad.q_proj(ad.norm_q(v[0, 0])).unflatten(-1, (4, 8)))
    out = ad(v, w)
    torch.testing.assert_close(out[0, 0], v[0, 0], rtol=0, atol=1e-5)
    assert not torch.allclose(out[1], v[1], atol=1e-3)


def test_adapter_slot_value_is_the_null_slot_with_a_learned_value():
    torch.manual_seed(0)
    ad = CrossAttentionAdapter(64, 32, 4, null_slot=True, slot_value=True)
    assert ad.config.slot_value and ad.null_value.shape == (4, 8)
    v, w = torch.randn(2, 5, 64), torch.randn(6, 64)
    with torch.no_grad():
        ad.gate.fill_(1.0)
        ad.null_key.normal_()
    null = CrossAttentionAdapter(64, 32, 4, null_slot=True)
    null.load_state_dict({k: t for k, t in ad.state_dict().items() if k != "null_value"})
    torch.testing.assert_close(ad(v, w), null(v, w), rtol=0, atol=0)  # zero value at first: the null slot
    with torch.no_grad():
        ad.null_value.normal_()
    out, attn = ad(v, w, return_attention=True)
    ref, ref_attn = _null_reference(ad, v, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, ref_attn[..., :6], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, null(v, w), atol=1e-3)
    # A token whose queries all pick the slot gets the slot's value (through out_proj), whatever W holds.
    with torch.no_grad():
        ad.null_key.copy_(1e4 * ad.q_proj(ad.norm_q(v[0, 0])).unflatten(-1, (4, 8)))
    want = v[0, 0] + torch.tanh(ad.gate) * ad.out_proj(ad.null_value.flatten())
    torch.testing.assert_close(ad(v, w)[0, 0], want, rtol=0, atol=1e-4)
    torch.testing.assert_close(ad(v, torch.randn(3, 64))[0, 0], want, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="slot_value needs null_slot"):
        CrossAttentionAdapter(64, 32, 4, slot_value=True)


def test_adapter_null_slot_round_trips_through_a_manifest():
    from rtrt.runtime.bundle import ClassInfo, Manifest
    from rtrt.runtime.errors import BundleError
    from rtrt.runtime.detection import AdapterConfig

    m = Manifest(classes=[ClassInfo(name="cone")], d_llm=64, adapter=AdapterConfig(64, 32, 4, null_slot=True))
    d = m.to_dict()
    assert d["adapter"]["null_slot"] is True and Manifest.from_dict(d).adapter.null_slot is True
    # Off, the key is not written: the manifest is the one older rtrt wrote, and reads as off.
    off = Manifest(classes=[ClassInfo(name="cone")], d_llm=64, adapter=AdapterConfig(64, 32, 4)).to_dict()
    assert "null_slot" not in off["adapter"] and Manifest.from_dict(off).adapter.null_slot is False
    d["adapter"]["null_slot"] = "yes"
    with pytest.raises(BundleError, match="null_slot must be true or false"):
        Manifest.from_dict(d)
    assert "slot_value" not in off["adapter"]
    valued = Manifest(classes=[ClassInfo(name="cone")], d_llm=64,
                      adapter=AdapterConfig(64, 32, 4, null_slot=True, slot_value=True)).to_dict()
    assert valued["adapter"]["slot_value"] is True and Manifest.from_dict(valued).adapter.slot_value is True
    valued["adapter"]["null_slot"] = False
    with pytest.raises(BundleError, match="slot_value needs null_slot"):
        Manifest.from_dict(valued)
