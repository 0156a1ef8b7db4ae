"""Every timm family a user picks from the hub works end to end, as ``timm:<architecture>.<tag>``.

The smallest variant of each family, with weights written from a random init into a temporary
``$AUTOML_TL_WEIGHTS_DIR`` (the loading path the hub's files take, with no network): built at an image size
that is not its native one, every freeze depth trains one step, cached features, the artifact round trip,
the Predictor and the ONNX export answer as the network does.

The ONNX exports (torch.export's tracing: most of the cost) run in worker processes while the next families
train, and ``test_onnx_export_agrees`` collects them; torch runs on one thread, since batches of two small
images gain nothing from more and a busy machine makes idle threads spin.

    .venv/bin/python -m pytest -q tests/test_backbone_families.py
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from automl_tl.backbones import LocalFile, create_backbone, layer_index, resolve_spec
from automl_tl.backbones._builder import freeze, frozen_names
from automl_tl.train.trial_data import TrialData

# family -> the smallest pretrained variant timm 1.0.31 has of it (and LCNet, HGNetV2: convolutional heads).
# Ordered by the cost of their ONNX export, the dearest first: each export runs in a worker while the main
# process goes on with the families after it, so none is left to wait for at the end.
FAMILIES = {
    # The smaller 'rw' MaxViTs attend in channels-last layout, which torch 2.14's ONNX exporter cannot
    # reshape with a dynamic batch: the smallest that exports is the original (tf) layout's.
    "maxvit": "maxvit_tiny_tf_224.in1k",
    "eva02": "eva02_tiny_patch14_224.mim_in22k",
    "siglip": "vit_base_patch16_siglip_224.webli",  # no SigLIP image tower smaller than base has weights
    "swin": "swin_tiny_patch4_window7_224.ms_in1k",
    "deit3": "deit3_small_patch16_224.fb_in1k",
    "dinov2_registers": "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit": "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
    "convnextv2": "convnextv2_atto.fcmae_ft_in1k",
    "clip_vit": "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m",
    "tiny_vit": "tiny_vit_5m_224.in1k",
    "fastvit": "fastvit_t8.apple_in1k",
    "convnext": "convnext_atto.d2_in1k",
    "resnet": "resnet10t.c3_in1k",
    "resnetv2": "resnetv2_18.ra4_e3600_r224_in1k",
    "efficientnet": "efficientnet_b0.ra_in1k",
    "efficientnetv2": "tf_efficientnetv2_b0.in1k",
    "mobilenetv3": "mobilenetv3_small_050.lamb_in1k",
    "mobilenetv4": "mobilenetv4_conv_small_050.e3000_r224_in1k",
    "ghostnet": "ghostnet_100.in1k",
    "lcnet": "lcnet_050.ra2_in1k",
    "hgnetv2": "hgnetv2_b0.ssld_stage2_ft_in1k",
    "regnet": "regnetx_002.pycls_in1k",
}
SIZE = 64  # no family's native size: ViTs are built for it, with their position embeddings resampled
CLASSES = ("a", "b")


def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    _one_thread()
    yield
    torch.set_num_threads(before)


def _export_onnx(artifact: Path, out: Path) -> Path:
    from automl_tl.inference.export import export_model

    return export_model(artifact, "onnx", out)


@pytest.fixture(scope="module")
def exporter() -> Iterator[ProcessPoolExecutor]:
    """Worker processes that export each family's artifact while the main process goes on to the next."""
    workers = max(1, min(4, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        yield pool
        pool.shutdown(cancel_futures=True)


# family -> (its export under way, the batch, the network's probabilities on it)
EXPORTS: dict[str, tuple[Future[Path], np.ndarray, np.ndarray]] = {}


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where a user puts downloaded weights; each family writes its random-init file there when it starts, so
    the first export is under way in a worker before the last file is written."""
    folder = tmp_path_factory.mktemp("weights")
    before = os.environ.get("AUTOML_TL_WEIGHTS_DIR")
    os.environ["AUTOML_TL_WEIGHTS_DIR"] = str(folder)
    yield folder
    if before is None:
        del os.environ["AUTOML_TL_WEIGHTS_DIR"]
    else:
        os.environ["AUTOML_TL_WEIGHTS_DIR"] = before


def _write_weights(arch: str, folder: Path) -> None:
    """Random-init weights of ``arch`` in timm's key layout, as a downloaded file has them."""
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / f"{arch}.safetensors"))


@pytest.fixture(scope="module")
def trial_data(tmp_path_factory: pytest.TempPathFactory) -> TrialData:
    """A small decoded data set (two classes of noise images) as a trial sees it."""
    from automl_tl.config import load_config
    from automl_tl.runs.rundir import RunDir
    from automl_tl.sweep.driver import prepare_data

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in CLASSES:
        (root / label).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("run")
    config = load_config({"data": {"source": str(root), "cache_dir": str(cache)}})
    return prepare_data(config, RunDir(run), None, progress=False)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_end_to_end(
    family: str, weights_folder: Path, trial_data: TrialData, exporter: ProcessPoolExecutor,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    from automl_tl.inference.artifact import MemberRecord, load_artifact, write_artifact
    from automl_tl.inference.predictor import Predictor
    from automl_tl.inference.transforms import Preprocessing
    from automl_tl.train.features import cached_features
    from automl_tl.train.loop import TrialConfig, _make_optimizer

    started = time.perf_counter()
    name = f"timm:{FAMILIES[family]}"
    _write_weights(FAMILIES[family], weights_folder)
    spec = resolve_spec(name)
    assert spec.weights == LocalFile(str(weights_folder / f"{FAMILIES[family]}.safetensors"), license=spec.license)
    assert spec.input_size != SIZE

    # Every freeze depth trains one step: exactly the stages above the depth (and the head) move. Built once;
    # each depth freezes a superset of the one before, as create_backbone freezes a fresh network.
    x, y = _batch(), torch.tensor([0, 1])
    net = create_backbone(name, num_classes=2, freeze_depth=0, image_size=SIZE).net
    for depth in range(spec.max_freeze_depth + 1):
        model = freeze(net, spec, depth)
        frozen = frozen_names(spec, depth)
        head = model.head_name + "."
        for pname, param in model.net.named_parameters():
            expect_frozen = not pname.startswith(head) and any(pname == f or pname.startswith(f + ".") for f in frozen)
            assert param.requires_grad is not expect_frozen, (depth, pname)
            if depth and not pname.startswith(head):  # the stages layer-wise decay sees are those frozen
                assert (layer_index(spec, pname) <= depth) is expect_frozen, (depth, pname)
        cfg = TrialConfig.from_params({
            "backbone": name, "freeze_depth": depth, "learning_rate": 0.01, "backbone_lr_ratio": 0.5,
            "augmentation": "none", "optimizer": "sgd", "weight_decay": 0.0, "label_smoothing": 0.0, "batch_size": 2,
            "max_epochs": 1, "head": "linear", "head_dropout": 0.0, "image_size": SIZE, "layer_decay": 0.8,
        })  # fmt: skip
        optimizer = _make_optimizer(model, cfg)
        before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        moved = {n for n, p in model.net.named_parameters() if not torch.equal(p, before[n])}
        assert moved and all(model.net.get_parameter(n).requires_grad for n in moved), depth
        assert any(n.startswith(head) for n in moved)
        model.zero_grad(set_to_none=True)
    trainable = {n for n, _ in model.trainable_parameters()}
    assert trainable == {f"net.{n}" for n, _ in model.net.named_parameters() if n.startswith(head)}  # the head alone
    assert len(trainable) == 2

    # Cached features of the fully frozen extractor: the head's input width, computed once.
    pre = Preprocessing.from_spec(spec, SIZE)
    features = cached_features(trial_data, name, pre, model.eval())
    assert features.train.shape == (len(trial_data.train_idx), spec.feature_width) and not features.hit
    assert cached_features(trial_data, name, pre, model).hit
    with torch.inference_mode():
        expected = torch.softmax(model(x), dim=1)
        assert model.forward_features(x).shape == (2, spec.feature_width)

    # Artifact round trip, the Predictor and (in a worker, collected below) the ONNX export answer as the network.
    folder = tmp_path_factory.mktemp(family)
    record = MemberRecord.create("m0", name, num_classes=2, image_size=SIZE)
    write_artifact(folder / "artifact", CLASSES, [(record, model.state_dict())], [1.0], 1.0)
    export = exporter.submit(_export_onnx, folder / "artifact", folder / "model.onnx")
    EXPORTS[family] = (export, x.numpy(), expected.numpy())
    artifact = load_artifact(folder / "artifact")
    saved, state = artifact.state_dict(0), model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    predictor = Predictor(artifact)  # one member of weight 1 at temperature 1: its probabilities are the answer
    (got,) = predictor.member_probabilities([x])
    assert np.abs(got - expected.double().numpy()).max() < 1e-4
    print(f"{family}: {time.perf_counter() - started:.1f} s, {spec.max_freeze_depth + 1} freeze depths")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_export_agrees(family: str) -> None:
    """Each family's artifact, exported as ONNX by ``automl-tl export``'s own function, answers as the network."""
    import onnxruntime

    if family not in EXPORTS:
        pytest.fail(f"test_family_end_to_end[{family}] did not reach its export (it failed or was not selected)")
    export, x, expected = EXPORTS.pop(family)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(export.result()), options, providers=["CPUExecutionProvider"])
    (onnx_probs,) = session.run(None, {"input": x})
    assert np.abs(onnx_probs - expected).max() < 1e-4
