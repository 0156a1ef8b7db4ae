r"""Serve an artifact with Ray Serve on 127.0.0.1 and query it with `requests` in every request form.

    .venv/bin/python examples/03_serve_and_query.py runs/quickstart --images a.jpg b.jpg
    .venv/bin/python examples/03_serve_and_query.py runs/quickstart --smoke-test    # images from ../shared/datasets
    .venv/bin/python examples/03_serve_and_query.py runs/quickstart --keep-serving  # then open the printed URL

The same three forms with curl, once the server runs:

    curl -s -X POST -H 'Content-Type: image/jpeg' --data-binary @a.jpg 'http://127.0.0.1:8000/v1/predict?top_k=3'
    curl -s -X POST -F file=@a.jpg -F file=@b.jpg http://127.0.0.1:8000/v1/predict
    curl -s -X POST -H 'Content-Type: application/json' -d "{\"images\": [\"$(base64 -w0 a.jpg)\"]}" \
        http://127.0.0.1:8000/v1/predict
"""

from __future__ import annotations

import argparse
import base64
import socket
import time
from pathlib import Path

import requests

from automl_tl.serve import start_server, stop_server

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def smoke_images() -> list[Path]:
    """One image per class of hymenoptera's val split, so the answers can be checked against the folder name."""
    root = SHARED / "hymenoptera" / "val"
    if not root.is_dir():
        raise SystemExit(f"--smoke-test needs {root}, which this clone does not have; pass --images instead")
    return [next(p for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES) for d in sorted(root.iterdir())]


def show(form: str, answer: dict, names: list[str]) -> None:
    for name, prediction in zip(names, answer["predictions"], strict=True):
        top = ", ".join(f"{label} {p:.3f}" for label, p in zip(prediction["labels"], prediction["probabilities"]))
        print(f"{form:>9} | {name}: {top}  (forward {prediction['timing']['forward_ms']:.1f} ms)")


def query(url: str, images: list[Path]) -> None:
    """Ask about every image in each of the three request forms; all three must agree."""
    session = requests.Session()
    predict = f"{url}/v1/predict"
    names = [p.name for p in images]
    answers = {}

    raw = [session.post(predict, params={"top_k": 2}, data=p.read_bytes(),
                        headers={"Content-Type": "image/jpeg" if p.suffix.lower() != ".png" else "image/png"},
                        timeout=60) for p in images]  # fmt: skip
    for reply in raw:
        reply.raise_for_status()
    answers["raw"] = {"predictions": [r.json()["predictions"][0] for r in raw]}

    files = [("file", (p.name, p.read_bytes())) for p in images]
    reply = session.post(predict, params={"top_k": 2}, files=files, timeout=60)
    reply.raise_for_status()
    answers["multipart"] = reply.json()

    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in images]
    reply = session.post(predict, params={"top_k": 2}, json={"images": encoded}, timeout=60)
    reply.raise_for_status()
    answers["base64"] = reply.json()

    for form, answer in answers.items():
        show(form, answer, names)
    tops = {form: [p["labels"][0] for p in a["predictions"]] for form, a in answers.items()}
    if len({tuple(t) for t in tops.values()}) != 1:
        raise SystemExit(f"the request forms disagree: {tops}")

    bad = session.post(predict, data=b"not an image", headers={"Content-Type": "image/jpeg"}, timeout=60)
    print(f"corrupt bytes -> HTTP {bad.status_code}: {bad.json().get('detail')}")
    meta = session.get(f"{url}/v1/metadata", timeout=60).json()
    print(f"metadata: mode {meta['mode']}, classes {meta['class_names']}, members {len(meta['members'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a run directory or its artifact/ folder")
    parser.add_argument("--images", nargs="+", type=Path, help="image files to classify")
    parser.add_argument("--mode", choices=["best", "ensemble"], default="ensemble")
    parser.add_argument("--port", type=int, help="HTTP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    parser.add_argument("--smoke-test", action="store_true", help="query one hymenoptera val image per class")
    args = parser.parse_args()

    images = smoke_images() if args.smoke_test else args.images
    if not images:
        parser.error("give --images (or --smoke-test)")
    url = start_server(args.artifact, mode=args.mode, host="127.0.0.1", port=args.port or free_port())
    try:
        print(f"serving {args.mode} at {url} (page: {url}/, OpenAPI: {url}/docs)")
        health = requests.get(f"{url}/v1/healthz", timeout=30)
        print(f"healthz -> HTTP {health.status_code}: {health.json()['status']}")
        query(url, images)
        if args.smoke_test:
            truths = [p.parent.name for p in images]
            print(f"true labels: {', '.join(f'{p.name}={t}' for p, t in zip(images, truths, strict=True))}")
        while args.keep_serving:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop_server()
        print("server stopped")


if __name__ == "__main__":
    main()
