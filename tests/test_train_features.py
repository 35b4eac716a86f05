"""Region features (``rtrt.trainer.features``): patch tokens pooled inside boxes, the disk cache, bad inputs."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from rtrt.runtime.errors import ImageError, InputError
from rtrt.runtime.image import load_image, vfm_pixels
from rtrt.trainer.features import RegionFeatureExtractor, box_weights, check_box, vfm_spec
from fixtures.train_data import VFM_ARCH, VFM_KWARGS, make_dataset, tiny_vfm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    make_dataset(root / "data", n_images=3)
    tiny_vfm(root / "vfm.safetensors")
    spec = vfm_spec("timm", str(root / "vfm.safetensors"), VFM_ARCH, 64, VFM_KWARGS)
    images = sorted((root / "data" / "train" / "images").glob("*.jpg"))
    return root, spec, images


def test_box_weights_are_patch_overlaps():
    grid = 4  # a 64x64 image, 16-px patches
    one_patch = box_weights((16, 32, 16, 16), (64, 64), grid).view(grid, grid)
    assert one_patch[2, 1] == 1 and one_patch.sum() == 1
    inside = box_weights((20, 36, 3, 2), (64, 64), grid).view(grid, grid)  # smaller than a patch
    assert inside[2, 1] == 1
    halves = box_weights((8, 0, 16, 16), (64, 64), grid).view(grid, grid)
    assert torch.allclose(halves[0, :2], torch.tensor([0.5, 0.5])) and halves.sum().item() == pytest.approx(1.0)
    # Non-square original image: coordinates scale per axis.
    wide = box_weights((0, 0, 64, 32), (128, 64), grid).view(grid, grid)
    assert torch.allclose(wide[:2, :2], torch.full((2, 2), 0.25))


@pytest.mark.parametrize("box, why", [
    ((10, 10, 0, 5), "zero area"),
    ((10, 10, 5, -1), "zero area"),
    ((60, 10, 10, 10), "outside"),
    ((-1, 0, 5, 5), "outside"),
    ((0, 0, float("nan"), 5), "finite"),
])
def test_bad_boxes_are_one_line_errors(box, why):
    with pytest.raises(InputError, match=why) as e:
        check_box(box, (64, 48), "img.jpg region 1")
    assert "\n" not in str(e.value) and "img.jpg" in str(e.value)


def test_features_pool_the_whole_image_tokens(setup):
    root, spec, images = setup
    ex = RegionFeatureExtractor(spec, cache_dir=None)
    boxes = [(4.0, 6.0, 30.0, 20.0), (50.0, 30.0, 8.0, 8.0)]
    feats, bad = ex.extract([(str(images[0]), boxes)])
    assert bad == [] and feats[0].shape == (2, spec.dim)
    img = load_image(images[0])
    with torch.no_grad():
        tokens = ex.backbone(vfm_pixels([img], spec.image_size, spec.mean, spec.std))[0]
    for box, f in zip(boxes, feats[0]):
        assert torch.allclose(f, box_weights(box, img.size, 4) @ tokens, atol=1e-6)
    # Not a resize of the crop: features of the crop alone differ.
    crop = img.crop((4, 6, 34, 26))
    with torch.no_grad():
        crop_tokens = ex.backbone(vfm_pixels([crop], spec.image_size, spec.mean, spec.std))[0].mean(0)
    assert not torch.allclose(crop_tokens, feats[0][0], atol=1e-3)


def test_cache_hits_on_second_run_and_misses_on_change(setup, tmp_path):
    root, spec, images = setup
    requests = [(str(p), [(2.0, 2.0, 20.0, 20.0), (30.0, 10.0, 12.0, 30.0)]) for p in images]
    first = RegionFeatureExtractor(spec, cache_dir=tmp_path)
    a, _ = first.extract(requests)
    assert (first.computed, first.cached) == (6, 0)
    second = RegionFeatureExtractor(spec, cache_dir=tmp_path)  # a new run: nothing in memory
    b, _ = second.extract(requests)
    assert (second.computed, second.cached) == (0, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # A new box of a cached image, and an image whose bytes changed, are computed.
    changed = tmp_path / "changed.jpg"
    Image.open(images[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    third = RegionFeatureExtractor(spec, cache_dir=tmp_path)
    third.extract([(str(images[0]), [(0.0, 0.0, 8.0, 8.0)]), (str(changed), requests[0][1])])
    assert third.computed == 3
    # Other VFM weights: another model key, so nothing is shared.
    other = RegionFeatureExtractor(spec, backbone=_perturbed(first), cache_dir=tmp_path)
    assert other.key != first.key
    other.extract(requests[:1])
    assert other.computed == 2


def _perturbed(ex: RegionFeatureExtractor):
    import copy

    backbone = copy.deepcopy(ex.backbone)
    with torch.no_grad():
        next(backbone.parameters()).add_(0.01)
    return backbone


def test_missing_and_unreadable_images(setup, tmp_path):
    root, spec, images = setup
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    ex = RegionFeatureExtractor(spec, cache_dir=tmp_path / "cache")
    box = [(1.0, 1.0, 10.0, 10.0)]
    with pytest.raises(ImageError, match="missing.jpg: file not found"):
        ex.extract([(str(images[0]), box), (str(tmp_path / "missing.jpg"), box)])
    with pytest.raises(ImageError, match="broken.jpg"):
        ex.extract([(str(broken), box)])
    feats, bad = ex.extract([(str(tmp_path / "missing.jpg"), box), (str(images[0]), box), (str(broken), box)], skip_bad=True)
    assert feats[0] is None and feats[2] is None and feats[1].shape == (1, spec.dim)
    assert len(bad) == 2 and "missing.jpg" in bad[0] and "broken.jpg" in bad[1]
