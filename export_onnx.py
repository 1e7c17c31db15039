"""Export a trained backbone to ONNX (dynamic batch) and prove it computes the same embeddings.

    python export_onnx.py --checkpoint runs/demo/backbone.pt --out runs/demo/backbone.onnx

The exported graph is run with onnxruntime on random inputs next to PyTorch; if the largest
absolute difference between the two sets of L2-normalised embeddings is not below the
tolerance, the ONNX file is deleted and the command fails: a model that silently disagrees
with its checkpoint is worse than no export.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import IMAGE_SIZE, load_backbone
from utils import add_debug_flag, get_logger, run_cli

PARITY_TOLERANCE = 1e-4  # max |difference| of L2-normalised embeddings
PARITY_BATCH = 3  # differs from the export batch, so the dynamic batch axis is exercised
EXPORT_BATCH = 2
ONNX_OPSET = 18

log = get_logger("export_onnx")


class ParityError(RuntimeError):
    """The ONNX model's embeddings differ from PyTorch's beyond the tolerance."""


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def export_onnx(model: nn.Module, out_path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` (eval mode, CPU, float32) as ONNX with a dynamic batch axis."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().to("cpu").to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(EXPORT_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    tmp = out_path.with_name(out_path.name + ".tmp")
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():  # the torch.export-based exporter (needs onnxscript)
        torch.onnx.export(model, (dummy,), str(tmp), input_names=["images"],
                          output_names=["embeddings"], opset_version=opset,
                          dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    tmp.replace(out_path)
    return out_path


def check_parity(model: nn.Module, onnx_path: str | Path, batch: int = PARITY_BATCH,
                 seed: int = 0) -> float:
    """Max abs difference between normalised PyTorch and onnxruntime embeddings."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
    with torch.inference_mode():
        expected = model.eval().float().cpu()(images).numpy().astype(np.float64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["embeddings"], {"images": images.numpy()})
    return float(np.abs(_normalise(expected) - _normalise(got.astype(np.float64))).max())


def export_and_verify(model: nn.Module, out_path: str | Path,
                      tolerance: float = PARITY_TOLERANCE) -> float:
    """Export, then check parity; on failure delete the file and raise ParityError."""
    path = export_onnx(model, out_path)
    diff = check_parity(model, path)
    if not diff < tolerance:
        path.unlink(missing_ok=True)
        raise ParityError(f"{path}: ONNX embeddings differ from PyTorch by {diff:.3g} "
                          f"(tolerance {tolerance:g}); the export was deleted")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    parser.add_argument("--checkpoint", required=True, help="backbone.pt or a training checkpoint")
    parser.add_argument("--out", default=None, help="ONNX path (default: beside the checkpoint)")
    parser.add_argument("--network", default=None, help="else read from config.json beside it")
    parser.add_argument("--embedding-size", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_suffix(".onnx")
    try:
        model = load_backbone(checkpoint, network=args.network,
                              embedding_size=args.embedding_size)
        diff = export_and_verify(model, out, args.tolerance)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    log.info("wrote %s (max |diff| of normalised embeddings vs PyTorch: %.2e)", out, diff)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
