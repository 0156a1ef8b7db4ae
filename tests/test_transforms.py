"""The evaluation transform: the same pixels as torchvision's v2 pipeline of transforms, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from automl_tl.inference.transforms import Preprocessing, eval_transform

SETTINGS = [
    Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875),
    Preprocessing(160, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 0.875),
    Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 1.0),
]


def _reference(pre: Preprocessing) -> T.Compose:
    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[pre.interpolation]
    return T.Compose([
        T.ToImage(),
        T.Resize(pre.resize_side, interpolation=mode, antialias=True),
        T.CenterCrop(pre.input_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(pre.mean), list(pre.std)),
    ])  # fmt: skip


def _assert_same(pre: Preprocessing, image: np.ndarray) -> None:
    ours, theirs = eval_transform(pre), _reference(pre)
    for given in (image, Image.fromarray(image)):
        got, want = ours(given), theirs(given)
        assert type(got) is torch.Tensor and got.shape == (3, pre.input_size, pre.input_size) and got.is_contiguous()
        assert torch.equal(got, want.as_subclass(torch.Tensor)), (pre, image.shape, type(given).__name__)


@pytest.mark.parametrize("pre", SETTINGS, ids=lambda p: f"{p.input_size}-{p.interpolation}")
@pytest.mark.parametrize("shape", [(375, 500), (500, 366), (333, 333), (128, 128), (97, 1001), (40, 50)])
def test_noise_images_match_the_torchvision_pipeline(pre: Preprocessing, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    _assert_same(pre, rng.integers(0, 256, (*shape, 3), dtype=np.uint8))  # upscaled, downscaled and untouched


@pytest.mark.parametrize("pre", SETTINGS, ids=lambda p: f"{p.input_size}-{p.interpolation}")
def test_real_photos_match_the_torchvision_pipeline(pre: Preprocessing, hymenoptera_dir: Path) -> None:
    files = sorted((hymenoptera_dir / "val").rglob("*.jpg"))[::12]
    assert len(files) >= 8
    for path in files:
        with Image.open(path) as im:
            _assert_same(pre, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("pre", SETTINGS, ids=lambda p: f"{p.input_size}-{p.interpolation}")
def test_sweep_validation_scores_through_the_inference_transform_object(pre: Preprocessing) -> None:
    """Training's "none" policy (sweep validation, the frozen-feature cache) is the object inference uses, and
    the cache's CHW tensors give the pixels the HWC arrays give, as training's former pipeline computed them."""
    from automl_tl.train.augment import array_to_tensor, train_transform

    assert train_transform("none", pre) is eval_transform(pre)
    image = np.random.default_rng(7).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    image.flags.writeable = False  # as the image cache hands it out
    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[pre.interpolation]
    former = T.Compose([
        T.Resize(pre.resize_side, interpolation=mode, antialias=True),
        T.CenterCrop(pre.input_size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(pre.mean), list(pre.std)),
    ])  # fmt: skip
    got = eval_transform(pre)(array_to_tensor(image))
    assert torch.equal(got, eval_transform(pre)(image))
    assert torch.equal(got, former(array_to_tensor(image)).as_subclass(torch.Tensor))
    with pytest.raises(ValueError, match="CHW uint8"):
        eval_transform(pre)(torch.zeros(3, 8, 8))


def test_a_member_served_with_test_time_flip_averages_both_views_on_every_path(tmp_path: Path) -> None:
    """The manifest's ``tta`` is applied where members are built, so Predictor, Serve and export agree."""
    import dataclasses

    from automl_tl.inference.artifact import load_artifact
    from automl_tl.inference.export import build_export_graph
    from automl_tl.inference.predictor import Predictor

    from .test_artifact import make_artifact, make_member

    record, state = make_member("m", 64)
    plain = load_artifact(make_artifact(tmp_path / "plain", [(record, state)]))
    tta_dir = make_artifact(tmp_path / "tta", [(dataclasses.replace(record, tta=("hflip",)), state)])
    tta = load_artifact(tta_dir)
    assert tta.members[0].tta == ("hflip",) and plain.members[0].tta == ()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        base = plain.build_model(0)
        want = (torch.softmax(base(x), 1) + torch.softmax(base(x.flip(3)), 1)) / 2
        got = torch.softmax(tta.build_model(0)(x), 1)
        assert not torch.allclose(torch.softmax(base(x), 1), want, atol=1e-4)  # the flip does change the answer
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        graph, _, _ = build_export_graph(tta, mode="best")  # what every export format writes
        images = [np.random.default_rng(i).integers(0, 255, (80, 72, 3), dtype=np.uint8) for i in range(2)]
        served = Predictor.load(tta_dir, mode="best").predict_proba(images)
        batch = torch.stack([eval_transform(Preprocessing.from_dict(record.preprocessing))(im) for im in images])
        np.testing.assert_allclose(graph(batch).numpy(), served, atol=1e-5)
