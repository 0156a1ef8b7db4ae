"""Export an artifact (the ensemble, or one member) as one ONNX graph and run it with onnxruntime.

    .venv/bin/python examples/05_export_onnx.py runs/quickstart/artifact --out model.onnx
    .venv/bin/python examples/05_export_onnx.py runs/quickstart/artifact --smoke-test

The graph takes a preprocessed float32 batch (N, 3, S, S) and returns calibrated class probabilities.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from automl_tl.inference.artifact import load_artifact
from automl_tl.inference.export import export_input, export_model
from automl_tl.inference.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="artifact folder (RUN_DIR/artifact)")
    parser.add_argument("--out", default="model.onnx")
    parser.add_argument("--member", help="export one member instead of the ensemble")
    parser.add_argument("--smoke-test", action="store_true", help="export, then check parity on random images")
    args = parser.parse_args()

    out = export_model(args.artifact, "onnx", Path(args.out), member=args.member)
    pre, _ = export_input(load_artifact(args.artifact), member=args.member)
    print(f"wrote {out} (input float32 N x 3 x {pre.input_size} x {pre.input_size})")

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(pre.input_size, pre.input_size, 3), dtype=np.uint8) for _ in range(4)]
    predictor = Predictor.load(args.artifact)
    batch = predictor.preprocess(images, member=args.member or predictor.artifact.members[0].member_id)[0]
    if args.member is None and len({m.preprocessing["input_size"] for m in predictor.artifact.members}) > 1:
        print("members differ in input size: the graph resizes inside; parity is checked by the test suite")
        return
    (onnx_probs,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    expected = predictor.predict_proba(images, member=args.member)
    diff = float(np.abs(onnx_probs - expected).max())
    print(f"onnxruntime vs Predictor: max |difference| {diff:.2e}")
    if args.smoke_test and diff > 1e-4:
        raise SystemExit(f"parity check failed: {diff:.2e} > 1e-4")


if __name__ == "__main__":
    main()
