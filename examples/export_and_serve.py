"""Export a DLGN to ONNX (verified in onnxruntime) and serve it with onnxruntime, batch by batch.

    python examples/export_and_serve.py [--model timm:resnet18] [--size 64] [--out out/example.onnx]
"""
from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
import torch

import relu2dlgn
from relu2dlgn.zoo import create_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="out/example.onnx")
    args = parser.parse_args(argv)

    model = create_model(args.model, num_classes=10).eval()            # your trained (and fine-tuned) network
    x = torch.randn(2, 3, args.size, args.size)
    dlgn = relu2dlgn.convert(model, mode="dlgn", example_inputs=x)

    report = relu2dlgn.export_onnx(dlgn, args.out, example_inputs=x)   # verified, or it raises ExportError
    print(report)

    session = ort.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).standard_normal((5, 3, args.size, args.size)).astype(np.float32)
    logits = session.run(None, {"x": batch})[0]                        # any batch size
    with torch.no_grad():
        ref = dlgn.eval()(torch.from_numpy(batch)).numpy()
    print(f"served a batch of {len(batch)}: predictions {logits.argmax(1).tolist()}, "
          f"max |onnxruntime - PyTorch| = {np.abs(logits - ref).max():.2e}")
    return {"max_error": float(np.abs(logits - ref).max()), "scale": float(np.abs(ref).max())}


if __name__ == "__main__":
    main()
