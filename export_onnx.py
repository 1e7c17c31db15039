"""Export a trained backbone to ONNX (dynamic batch) and prove it computes the same embeddings.

    python export_onnx.py --checkpoint runs/demo/backbone.pt --out runs/demo/backbone.onnx

The exported graph is run with onnxruntime on random inputs next to PyTorch; if the largest
absolute difference between the two sets of L2-normalised embeddings is not below the
tolerance, nothing is written (an earlier export at --out is kept) and the command fails: a
model that silently disagrees with its checkpoint is worse than no export.

The .onnx file is self-contained (weights inside) up to SINGLE_FILE_MAX_BYTES of weights;
past that (protobuf cannot hold 2 GB) the weights go to ``<out>.data`` beside it, and the
two must be moved together. The export is written and checked in a staging folder beside
--out and renamed into place only when whole, so a failed or killed export leaves no
half-written file and no orphaned weights.

Input ``images``: float32 N x 3 x 112 x 112, aligned face crops in RGB order, each pixel
mapped to (pixel - 127.5) / 127.5 (as training and every evaluation feed the backbone);
output ``embeddings``: N x E, not L2-normalised.

The model records what it came from in its ``metadata_props`` (``checkpoint``,
``checkpoint_sha256``: the checkpoint's path and content hash; ``input``: the input
convention above), which onnxruntime reads as
``session.get_modelmeta().custom_metadata_map``: a deployed model can be matched with its
checkpoint and evaluation results (which record the same hash).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import IMAGE_SIZE, load_backbone
from utils import (
    PIXEL_CENTRE,
    OutputKind,
    ToolkitError,
    add_debug_flag,
    check_output,
    checkpoint_record,
    claim_output,
    get_logger,
    positive_float,
    positive_int,
    remove_stale_temporaries,
    run_cli,
    starts_with,
    temp_prefix,
)

PARITY_TOLERANCE = 1e-4  # max |difference| of L2-normalised embeddings
NORM_FLOOR = 1e-12  # an all-zero embedding stays zero instead of becoming NaN
PARITY_BATCH = 3  # differs from the export batch, so the dynamic batch axis is exercised
EXPORT_BATCH = 2
ONNX_OPSET = 18
# Weights above this go to an external-data file: torch's own switch-over point
# (_LARGE_MODEL_THRESHOLD, 1.5 GiB), which leaves room for the graph under protobuf's 2 GiB.
SINGLE_FILE_MAX_BYTES = 1536 * 2**20
EXTERNAL_DATA_SUFFIX = ".data"  # onnxscript names the weights file <model file name>.data
STAGING_SUFFIX = ".onnx-staging"  # folder ".<out name>.<random>.onnx-staging" beside --out
# An ONNX file is a serialised ModelProto whose first field, written first, is ir_version
# (field 1, varint: tag byte 0x08); a PyTorch checkpoint starts "PK" (zip) or 0x80 (pickle)
ONNX_KIND = OutputKind("an ONNX model", starts_with(b"\x08"))

# what a deployer must feed the graph, recorded in the file itself (metadata key "input")
INPUT_CONVENTION = (f"images: float32 N x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}, aligned face crops, "
                    f"RGB, (pixel - {PIXEL_CENTRE}) / {PIXEL_CENTRE}; embeddings: "
                    "not L2-normalised")

log = get_logger("export_onnx")


class ParityError(ToolkitError, RuntimeError):
    """The ONNX model's embeddings differ from PyTorch's beyond the tolerance."""


class NonFiniteModelError(ToolkitError, ValueError):
    """A model whose PyTorch embeddings are NaN or inf (no export could match them)."""


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), NORM_FLOOR)


def external_data_path(out_path: str | Path) -> Path:
    """Where the weights of a model too large for one file go: ``<out>.data``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + EXTERNAL_DATA_SUFFIX)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers()))


def _set_metadata(onnx_path: Path, metadata: Mapping[str, str]) -> None:
    """Put ``metadata`` into the ONNX file's ``metadata_props`` (an external weights file
    stays as it is: only the graph file is rewritten)."""
    import onnx  # installed with the exporter (onnxscript needs it); only for exports

    proto = onnx.load(str(onnx_path), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))
    onnx.save(proto, str(onnx_path))


def export_onnx(model: nn.Module, out_path: str | Path, opset: int = ONNX_OPSET,
                single_file_max_bytes: int = SINGLE_FILE_MAX_BYTES,
                check: Callable[[Path], None] | None = None,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` (eval mode, CPU, float32) as ONNX with a dynamic batch axis: one
    self-contained file, or with ``<out>.data`` when its weights exceed
    ``single_file_max_bytes``; ``metadata`` goes into its ``metadata_props``.
    ``check(staged_path)`` may inspect the finished export before it replaces
    ``out_path``; if it (or anything else) raises, nothing is left."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().float().to("cpu").to(memory_format=torch.contiguous_format)
    dummy = torch.zeros(EXPORT_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():  # the torch.export-based exporter (needs onnxscript)
        program = torch.onnx.export(model, (dummy,), None, input_names=["images"],
                                    output_names=["embeddings"], opset_version=opset,
                                    dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
    # staged under the final names: the .onnx refers to its weights file by name
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(out_path, STAGING_SUFFIX),
                                    suffix=STAGING_SUFFIX,
                                    dir=out_path.parent))
    try:
        staged = staging / out_path.name
        program.save(staged, external_data=_weight_bytes(model) > single_file_max_bytes)
        if metadata:
            _set_metadata(staged, metadata)
        if check is not None:
            check(staged)
        staged_data = external_data_path(staged)
        if staged_data.exists():  # weights first: the new .onnx must never lack them
            os.replace(staged_data, external_data_path(out_path))
            os.replace(staged, out_path)
        else:
            os.replace(staged, out_path)
            # one file now: weights left by an earlier, external-data export are orphans
            external_data_path(out_path).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_path


def _test_images(batch: int, seed: int) -> torch.Tensor:
    """Random normalised inputs in [-1, 1], the same for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1


def check_finite_embeddings(model: nn.Module, source: str | Path, batch: int = PARITY_BATCH,
                            seed: int = 0) -> None:
    """NonFiniteModelError naming ``source`` when PyTorch's embeddings of the parity inputs
    hold NaN or inf (finite weights can overflow): a parity check would only say "differ by
    nan"."""
    with torch.inference_mode():
        out = model.eval().float().cpu()(_test_images(batch, seed))
    bad = int((~torch.isfinite(out).all(dim=1)).sum())
    if bad:
        raise NonFiniteModelError(f"{source}: the model gives non-finite (NaN/inf) embeddings "
                                  f"for {bad} of {batch} test images; nothing was written")


def check_parity(model: nn.Module, onnx_path: str | Path, batch: int = PARITY_BATCH,
                 seed: int = 0) -> float:
    """Max abs difference between normalised PyTorch and onnxruntime embeddings."""
    import onnxruntime as ort  # onnxruntime loads only for the parity check

    images = _test_images(batch, seed)
    with torch.inference_mode():
        expected = model.eval().float().cpu()(images).numpy().astype(np.float64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["embeddings"], {"images": images.numpy()})
    return float(np.abs(_normalise(expected) - _normalise(got.astype(np.float64))).max())


def export_and_verify(model: nn.Module, out_path: str | Path,
                      tolerance: float = PARITY_TOLERANCE,
                      source: str | Path = "the model",
                      metadata: Mapping[str, str] | None = None) -> float:
    """Export (with ``metadata``) and check parity before the file takes its place; on a
    mismatch nothing is written and ParityError is raised; a model whose embeddings are not
    finite is refused first (NonFiniteModelError naming ``source``, its checkpoint).
    Returns the max abs difference."""
    check_finite_embeddings(model, source)
    diffs = []

    def parity(staged: Path) -> None:
        diff = check_parity(model, staged)
        if not diff < tolerance:
            raise ParityError(f"{out_path}: ONNX embeddings differ from PyTorch by {diff:.3g} "
                              f"(tolerance {tolerance:g}); nothing was written")
        diffs.append(diff)

    export_onnx(model, out_path, check=parity, metadata=metadata)
    return diffs[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    parser.add_argument("--checkpoint", required=True, help="backbone.pt or a training checkpoint")
    parser.add_argument("--out", default=None, help="ONNX path (default: beside the checkpoint)")
    parser.add_argument("--network", default=None, help="else read from config.json beside it")
    parser.add_argument("--embedding-size", type=positive_int, default=None)
    parser.add_argument("--tolerance", type=positive_float, default=PARITY_TOLERANCE)
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_suffix(".onnx")
    # errors (missing or untrusted checkpoint, parity) are printed by run_cli, one line
    inputs = {"--checkpoint": checkpoint}
    # the export replaces or removes <out>.data too: it must not be the checkpoint either
    check_output(external_data_path(out), "--out's weights file", inputs)
    with claim_output(out, "--out", inputs, ONNX_KIND):
        model = load_backbone(checkpoint, network=args.network,
                              embedding_size=args.embedding_size)
        remove_stale_temporaries(out.parent, out.name, STAGING_SUFFIX)  # a killed export's
        diff = export_and_verify(model, out, args.tolerance, source=checkpoint,
                                 metadata={**checkpoint_record(checkpoint),
                                           "input": INPUT_CONVENTION})
    log.info("wrote %s (max |diff| of normalised embeddings vs PyTorch: %.2e)", out, diff)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
