"""Text encoders (``rtrt.trainer.text``) and a transformers DINOv3 as the phase-1 VFM, all tiny and offline."""
from __future__ import annotations

import pytest
import torch

from rtrt.runtime.errors import InputError
from rtrt.trainer.features import RegionFeatureExtractor, vfm_spec
from rtrt.trainer.text import class_texts, load_text_encoder
from fixtures.train_data import make_dataset, tiny_clip_config


def test_class_texts_put_the_name_first_and_drop_duplicates():
    texts, owner = class_texts(["traffic_cone", "dog"], {"traffic_cone": ["Traffic cone", "orange  pylon"], "dog": []})
    assert texts == ["traffic cone", "orange pylon", "dog"] and owner == [0, 0, 1]


def test_openclip_tower_from_a_config_file(tmp_path):
    enc = load_text_encoder(f"openclip:{tiny_clip_config(tmp_path)}")
    feats = enc.encode(["traffic cone", "dog", "traffic cone"])
    assert feats.shape == (3, enc.dim) == (3, 32) and not enc.pretrained
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3)) and torch.equal(feats[0], feats[2])
    assert enc.key.endswith(":random")


def test_transformers_encoder_mean_pools(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "traffic", "cone", "dog", "orange"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(tmp_path / "enc")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=9, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path / "enc")
    enc = load_text_encoder(f"hf:{tmp_path / 'enc'}")
    feats = enc.encode(["traffic cone", "dog"])
    assert feats.shape == (2, 16) and enc.pretrained
    # Padding does not change a text's feature (mean over real tokens only).
    assert torch.allclose(enc.encode(["dog"])[0], feats[1], atol=1e-5)


@pytest.mark.parametrize("ref, match", [
    ("clip", "expected openclip:NAME"),
    ("sbert:x", "not supported"),
    ("openclip:no-such-model", "unknown open_clip model"),
    ("hf:/no/such/dir", "cannot load"),
])
def test_bad_encoder_references(ref, match):
    with pytest.raises(InputError, match=match):
        load_text_encoder(ref)


def test_transformers_dinov3_as_the_vfm(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=64, patch_size=16, num_register_tokens=4)).save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text('{"resample": 2, "image_mean": [0.5, 0.5, 0.5]}')
    spec = vfm_spec("transformers", str(tmp_path / "dino"), image_size=64)
    assert (spec.kind, spec.dim, spec.patch_size) == ("transformers", 32, 16)
    assert (spec.resample, spec.reducing_gap, spec.mean) == ("bilinear", None, [0.5, 0.5, 0.5])  # read from its own config
    root = make_dataset(tmp_path / "data", n_images=1)
    ex = RegionFeatureExtractor(spec)
    assert ex.backbone.num_prefix_tokens == 5  # CLS + 4 registers dropped
    feats, _ = ex.extract([(str(root / "train" / "images" / "0000.jpg"), [(0.0, 0.0, 20.0, 20.0)])])
    assert feats[0].shape == (1, 32)
