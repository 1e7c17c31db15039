"""Who is this? Enrol the people you know, then name the faces in new photos, or say "unknown".

    python identify.py enrol --gallery runs/gallery --photos people/ --checkpoint runs/x/backbone.pt
    python identify.py enrol --gallery runs/gallery --remove Some_Name
    python identify.py search --gallery runs/gallery --photos queries/ --fpir 0.01

``enrol``: every photo under ``people/<identity>/`` (any depth) is aligned (align_faces'
central face), embedded with flip test-time augmentation as lfw_eval embeds, and stored with
its identity, source path and content hash. A rerun embeds only photos not yet enrolled (same
path and content; a photo whose content changed replaces its old entry); photos without a
face are listed, not fatal; ``--remove NAME`` removes an identity. The gallery records the
network and checkpoint (by sha256) it was built with and refuses another. It is saved every
``--save-every`` photos and at the end, each save a new generation swapped in by one rename:
a run killed at any point leaves the last saved gallery, and a rerun goes on from it.

``search``: for each photo (each face with ``--all-faces``), the top-k identities, each scored
by its best-matching enrolled image (cosine similarity), and the verdict: the best identity,
or "unknown" when its score is not above the threshold: ``--threshold T``; ``--fpir f``, the
one to use for "how often is an unknown face wrongly named": the threshold at which a
fraction f of searches by people not in the gallery name someone, estimated by searching
each enrolled image against the other identities; or ``--far f``, at 1:1 false-accept rate
f over the gallery's impostor pairs (a search compares a face with every image, so it names
far more than f of unknown faces). Each says how many probes or pairs it rests on. Writes
``--out`` (results.json) as ``{photo: [{"box": [x1, y1, x2, y2], "identity": verdict,
"matches": [{"identity", "score"}, ...]}, ...]}`` (a photo without a face: []), its
provenance beside it (``<out>.meta.json``: gallery and its generation, checkpoint sha256,
threshold), prints a table, and with ``--gallery-plot`` a PNG of each face beside its
matches. The checkpoint and network default to the gallery's own.

Exact search by default; ``--index hnsw`` or ``ivf`` at the first enrolment keeps an
approximate faiss index for galleries past a few hundred thousand images. Python API
(gallery/store.py): ``from identify import Gallery``; ``Gallery.create(path, dim)``,
``Gallery.open(path)``, ``g.add(embeddings, identities, sources)``, ``g.remove(name)``,
``g.save()``, ``len(g)``, ``g.identities()``, ``g.search(queries, k=5)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from evaluation.verification import embed
from gallery.photos import (
    central_faces,
    contact_sheet,
    enrolment_photos,
    every_face,
    query_photos,
)
from gallery.store import INDEX_KINDS, MANIFEST, Gallery, GalleryError
from gallery.threshold import FarThreshold, FpirThreshold, far_threshold, fpir_threshold
from utils import (
    FACE_CROP_SIZE,
    FOLDER,
    OutputKind,
    ToolkitError,
    add_debug_flag,
    atomic_write_text,
    can_write_in,
    claim_output,
    file_sha256,
    first_few,
    fraction,
    get_device,
    positive_int,
    read_image,
    run_cli,
    starts_with,
)

__all__ = ["Gallery", "GalleryError", "far_threshold", "fpir_threshold", "main"]

DEFAULT_TOP_K = 5
DEFAULT_BATCH_SIZE = 64  # faces embedded per forward pass (as lfw_eval)
EMBED_CHUNK = 256  # aligned faces held before they are embedded (~9.6 MB of crops)
# photos enrolled between saves: each save rewrites the gallery's files (2 GB for a million
# 512-D faces), and a killed run redoes at most this many
DEFAULT_SAVE_EVERY = 5000
TABLE_MATCHES = 3  # matches the printed table shows after the verdict
SHEET_MAX_FACES = 40  # query faces the --gallery-plot sheet shows (rows), the first ones
UNKNOWN = "unknown"
BOX_DECIMALS = 2  # face boxes in results.json, to 1/100 of a pixel
COSINE_RANGE = (-1.0, 1.0)
JSON_KIND = OutputKind("a JSON file", starts_with(b"{"))
PNG_KIND = OutputKind("a PNG image", starts_with(b"\x89PNG"))
MAX_NAMED = 10  # photos a summary line names before "..."


class IdentifyError(ToolkitError, ValueError):
    """Arguments or inputs identify.py cannot use; the message names the flag or file."""


def _cosine(text: str) -> float:
    value = float(text)
    if not COSINE_RANGE[0] <= value <= COSINE_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be a cosine similarity in [-1, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=(
        "identify.py enrol --help and identify.py search --help list each command's flags"))
    add_debug_flag(parser)
    common = argparse.ArgumentParser(add_help=False)
    add_debug_flag(common)
    common.add_argument("--gallery", required=True, help="the gallery folder")
    common.add_argument("--checkpoint", default=None,
                        help="backbone.pt (enrol: needed for a new gallery; default: the "
                             "gallery's own)")
    common.add_argument("--network", default=None,
                        help="default: the gallery's, else config.json beside the checkpoint")
    common.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    common.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"faces per forward pass (default {DEFAULT_BATCH_SIZE})")
    sub = parser.add_subparsers(dest="command", required=True)
    enrol = sub.add_parser("enrol", parents=[common], help="add photos (or --remove names)",
                           description="Enrol <photos>/<identity>/<photo> files.")
    enrol.add_argument("--photos", default=None, help="folder of <identity>/<photo> files")
    enrol.add_argument("--remove", action="append", default=[], metavar="NAME",
                       help="remove an identity (repeat for several)")
    enrol.add_argument("--index", choices=INDEX_KINDS, default=None,
                       help="a new gallery's index: flat (exact, the default), hnsw or ivf "
                            "(approximate, for galleries past a few hundred thousand images)")
    enrol.add_argument("--half", action="store_true",
                       help="a new gallery stores float16 embeddings (half the memory)")
    enrol.add_argument("--save-every", type=positive_int, default=DEFAULT_SAVE_EVERY,
                       help=f"photos between saves (default {DEFAULT_SAVE_EVERY})")
    search = sub.add_parser("search", parents=[common], help="name the faces in photos",
                            description="Search the gallery for the faces in photos.")
    search.add_argument("--photos", required=True, help="a photo or a folder of photos")
    search.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K,
                        help=f"identities per face (default {DEFAULT_TOP_K})")
    verdict = search.add_mutually_exclusive_group()
    verdict.add_argument("--threshold", type=_cosine, default=None,
                         help="a match must score above this cosine similarity")
    verdict.add_argument("--fpir", type=fraction, default=None,
                         help="the threshold at which this fraction of faces of people not in "
                              "the gallery is wrongly named (use this one), estimated by "
                              "searching each enrolled image against the other identities")
    verdict.add_argument("--far", type=fraction, default=None,
                         help="the threshold at this 1:1 false-accept rate over the gallery's "
                              "impostor pairs (a search names many more unknown faces)")
    search.add_argument("--all-faces", action="store_true",
                        help="every face of each photo, not only the central one")
    search.add_argument("--out", default="results.json", help="results (default results.json)")
    search.add_argument("--gallery-plot", default=None, metavar="PNG",
                        help="a contact sheet of each face beside its matches")
    # an approximate index's recall depends on the data: at 1M synthetic faces an eighth of
    # the lists (ivf's default) found exact search's top identity for 99% of queries
    search.add_argument("--nprobe", type=positive_int, default=None,
                        help="an ivf gallery: lists searched per query, for this search "
                             "(default: the gallery's, else an eighth of them; more: higher "
                             "recall, slower)")
    search.add_argument("--ef-search", type=positive_int, default=None,
                        help="an hnsw gallery: candidates kept per query, for this search")
    return parser


# ----------------------------------------------------------------------------- the model

def _model_for(args: argparse.Namespace, gallery: Gallery | None, device) -> tuple[Any, dict]:
    """The backbone to embed with and its record (network, embedding size, checkpoint and
    its sha256); IdentifyError when it is not the one ``gallery`` was built with."""
    recorded = (gallery.model if gallery is not None else None) or {}
    checkpoint = args.checkpoint or recorded.get("checkpoint")
    if checkpoint is None:
        raise IdentifyError(f"--checkpoint: needed to enrol into the new gallery {args.gallery}")
    if not Path(checkpoint).is_file():
        whose = "" if args.checkpoint else f" (the one {args.gallery} was built with; pass " \
                                           "--checkpoint)"
        raise IdentifyError(f"--checkpoint {checkpoint}: no such file{whose}")
    sha = file_sha256(checkpoint)
    network = args.network or recorded.get("network")
    if recorded and (sha != recorded.get("checkpoint_sha256") or
                     network != recorded.get("network")):
        raise IdentifyError(
            f"--gallery {args.gallery}: built with network {recorded.get('network')} from "
            f"{recorded.get('checkpoint')} (sha256 {str(recorded.get('checkpoint_sha256'))[:12]}), "
            f"not {network or '?'} from {checkpoint} (sha256 {sha[:12]}); embeddings of "
            "another model do not compare: use another gallery")
    from models import load_backbone  # torch loads with the model: --help stays quick

    model = load_backbone(checkpoint, network=network).to(device).eval()
    blank = np.zeros((1, FACE_CROP_SIZE, FACE_CROP_SIZE, 3), np.uint8)
    dim = embed(model, blank, device=device, progress=False).shape[1]
    if gallery is not None and dim != gallery.dim:
        raise IdentifyError(f"--checkpoint {checkpoint}: {dim}-D embeddings, but "
                            f"{args.gallery} holds {gallery.dim}-D ones")
    if gallery is not None and not recorded:  # e.g. built with the API: of unknown origin
        raise IdentifyError(f"--gallery {args.gallery}: records no network or checkpoint its "
                            "embeddings came from, so they cannot be compared with those of "
                            f"{checkpoint}; enrol into a new gallery (or set Gallery.model)")
    return model, {"network": model.network_name, "embedding_size": int(dim),
                   "checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": sha}


def _embed(model, crops: list[np.ndarray], args: argparse.Namespace, device) -> np.ndarray:
    return embed(model, np.stack(crops), batch_size=args.batch_size, device=device,
                 progress=False)


# ----------------------------------------------------------------------------- enrol

def _enrol(args: argparse.Namespace) -> int:
    path = Path(args.gallery)
    if args.photos is None and not args.remove:
        raise IdentifyError("enrol: give --photos (a folder of <identity>/<photo> files), "
                            "--remove NAME, or both")
    inputs = {"--photos": args.photos, "--checkpoint": args.checkpoint}
    with claim_output(path, "--gallery", inputs, FOLDER):  # one writer per gallery
        if not can_write_in(path):  # before the work its first save would lose
            raise IdentifyError(f"--gallery {path}: cannot write in it (read-only); enrol "
                                "into a writable gallery")
        gallery = Gallery.open(path) if (path / MANIFEST).exists() else None
        if gallery is not None and (args.index or args.half):
            raise IdentifyError(f"--gallery {path}: --index and --half choose a new gallery's "
                                f"storage; this one exists ({gallery.index_kind} index)")
        if args.remove and gallery is None:
            raise IdentifyError(f"--remove: {path} holds no gallery")
        for name in args.remove:
            print(f"removed {name}: {gallery.remove(name)} images")
        if args.photos is None:
            gallery.save()
            _print_size(gallery)
            return 0
        photos = enrolment_photos(args.photos)  # before the model loads
        device = get_device(args.device)
        model, record = _model_for(args, gallery, device)
        if gallery is None:
            gallery = Gallery.create(path, record["embedding_size"], index=args.index or "flat",
                                     half=args.half)
            gallery.model = record
        _enrol_photos(gallery, photos, model, args, device)
    return 0


def _enrol_photos(gallery: Gallery, photos: list[tuple[str, Path]], model,
                  args: argparse.Namespace, device) -> None:
    """Align, embed and add the photos not yet enrolled, saving every --save-every."""
    from faces.aligner import FaceAligner  # loads torch: after the arguments are checked

    started = time.monotonic()
    enrolled = gallery.enrolled()
    todo, replaced = [], []
    for identity, photo in tqdm(photos, desc="hash", unit="photo", leave=False):
        source, content = str(photo.resolve()), file_sha256(photo)
        if enrolled.get(source) == content:
            continue
        if source in enrolled:
            replaced.append(source)
        todo.append((identity, source, content, photo))
    gallery.remove_sources(replaced)
    identity_of = {photo: (identity, source, content) for identity, source, content, photo
                   in todo}
    pending: list[tuple[np.ndarray, tuple[str, str, str]]] = []
    no_face, unreadable, added, since_save = [], [], 0, 0
    aligner = FaceAligner(device=device)
    for found in central_faces(aligner, [t[3] for t in todo], args.batch_size):
        if found.error is not None:
            unreadable.append(str(found.path))
        elif not found.faces:
            no_face.append(str(found.path))
        else:
            pending.append((found.faces[0].crop, identity_of[found.path]))
        if len(pending) >= min(EMBED_CHUNK, args.save_every):
            added, since_save = added + len(pending), since_save + len(pending)
            _add(gallery, model, pending, args, device)
            pending = []
        if since_save >= args.save_every:
            gallery.save()
            since_save = 0
    _add(gallery, model, pending, args, device)
    added += len(pending)
    gallery.save()
    seconds = time.monotonic() - started
    print(f"enrolled {added} new photos ({len(photos) - len(todo)} already enrolled, "
          f"{len(replaced)} replaced by new content) in {seconds:.1f} s "
          f"({len(todo) / max(seconds, 1e-9):.1f} photos/s)")
    if no_face:
        print(f"no face found in {len(no_face)} photos (not enrolled): "
              f"{first_few(no_face, MAX_NAMED)}")
    if unreadable:
        print(f"{len(unreadable)} photos cannot be read: {first_few(unreadable, MAX_NAMED)}")
    _print_size(gallery)


def _add(gallery: Gallery, model, pending: list, args: argparse.Namespace, device) -> None:
    if pending:
        emb = _embed(model, [crop for crop, _ in pending], args, device)
        identities, sources, hashes = zip(*(meta for _, meta in pending), strict=True)
        gallery.add(emb, identities, sources, hashes)


def _print_size(gallery: Gallery) -> None:
    print(f"gallery {gallery.path}: {len(gallery)} images of {len(gallery.identities())} "
          f"identities ({gallery.index_kind} index)")


# ----------------------------------------------------------------------------- search

def _threshold(args: argparse.Namespace, gallery: Gallery) -> tuple[float | None, dict]:
    """The decision threshold (None: no verdict of "unknown") and what it rests on."""
    if args.fpir is not None:
        rate: FpirThreshold = gallery.fpir_threshold(args.fpir)
        sample = f" (a sample of {rate.probes:,})" if rate.sampled else ""
        print(f"threshold {rate.threshold:.4f} at FPIR {args.fpir:g}: {rate.above:,} of "
              f"{rate.probes:,} enrolled images{sample}, each searched as an unknown face "
              "against the other identities, score above it")
        return rate.threshold, {"threshold": rate.threshold, "threshold_from": "--fpir",
                                "fpir": args.fpir, "unknown_probes": rate.probes,
                                "unknown_probes_above": rate.above, "sampled": rate.sampled}
    if args.far is None:
        return args.threshold, {"threshold": args.threshold, "threshold_from": "--threshold"
                                if args.threshold is not None else None}
    found: FarThreshold = gallery.far_threshold(args.far)
    sample = f" (a sample of {found.images} images)" if found.sampled else ""
    print(f"threshold {found.threshold:.4f} at FAR {args.far:g}: {found.above:,} of "
          f"{found.pairs:,} impostor pairs of the gallery{sample} score above it")
    return found.threshold, {"threshold": found.threshold, "threshold_from": "--far",
                             "far": args.far, "impostor_pairs": found.pairs,
                             "impostor_pairs_above": found.above,
                             "impostor_images": found.images, "sampled": found.sampled}


def _search_breadth(args: argparse.Namespace, gallery: Gallery) -> None:
    """Apply --nprobe / --ef-search to this search only (the saved gallery keeps its own);
    IdentifyError when the gallery's index has no such setting."""
    for flag, value, kind, param in (("--nprobe", args.nprobe, "ivf", "nprobe"),
                                     ("--ef-search", args.ef_search, "hnsw", "ef_search")):
        if value is None:
            continue
        if gallery.index_kind != kind:
            raise IdentifyError(f"{flag}: gallery {args.gallery} has a {gallery.index_kind} "
                                f"index, not {kind}")
        gallery.params[param] = value


def _search(args: argparse.Namespace) -> int:
    gallery = Gallery.open(args.gallery)
    _search_breadth(args, gallery)
    photos = query_photos(args.photos)
    outputs = [(Path(args.out), "--out", JSON_KIND)]
    if args.gallery_plot:
        outputs.append((Path(args.gallery_plot), "--gallery-plot", PNG_KIND))
    inputs = {"--photos": args.photos, "--gallery": args.gallery}
    with ExitStack() as claims:
        for out, flag, kind in outputs:  # checked and locked before any work
            claims.enter_context(claim_output(out, flag, inputs, kind))
        device = get_device(args.device)
        model, record = _model_for(args, gallery, device)
        threshold, meta = _threshold(args, gallery)
        from faces.aligner import FaceAligner  # loads torch: after the arguments are checked

        aligner = FaceAligner(device=device)
        found = every_face(aligner, photos) if args.all_faces else \
            central_faces(aligner, photos, args.batch_size)
        results, sheet, unreadable = _match(found, gallery, model, args, device, threshold)
        meta.update({"gallery": str(args.gallery), "gallery_generation": gallery.generation,
                     "gallery_images": len(gallery),
                     "gallery_identities": len(gallery.identities()), **record,
                     "top_k": args.top_k, "all_faces": args.all_faces,
                     "unreadable": unreadable})
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
        atomic_write_text(f"{args.out}.meta.json", json.dumps(meta, indent=1) + "\n")
        _print_table(results)
        if unreadable:
            print(f"{len(unreadable)} photos cannot be read: {first_few(unreadable, MAX_NAMED)}")
        print(f"results: {args.out}")
        if args.gallery_plot:
            contact_sheet(_sheet_rows(sheet, aligner), args.gallery_plot, threshold)
            print(f"contact sheet: {args.gallery_plot}")
    return 0


def _match(found, gallery: Gallery, model, args: argparse.Namespace, device,
           threshold: float | None) -> tuple[dict, list, list[str]]:
    """results.json's content, the faces for the contact sheet and the unreadable photos."""
    results: dict[str, list] = {}
    sheet: list = []
    unreadable: list[str] = []
    batch: list[tuple[str, list[float], np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        emb = _embed(model, [crop for _, _, crop in batch], args, device)
        for (photo, box, crop), matches in zip(batch, gallery.search(emb, args.top_k, True),
                                               strict=True):
            best = matches[0] if matches else None
            verdict = best[0] if best and (threshold is None or best[1] > threshold) \
                else UNKNOWN
            results[photo].append({"box": box, "identity": verdict, "matches": [
                {"identity": name, "score": score} for name, score, _ in matches]})
            if len(sheet) < SHEET_MAX_FACES:
                sheet.append((f"{Path(photo).name}\n{verdict}", crop, matches))
        batch.clear()

    for photo in found:
        results[str(photo.path)] = []
        if photo.error is not None:
            unreadable.append(str(photo.path))
        batch.extend((str(photo.path), [round(v, BOX_DECIMALS) for v in f.box], f.crop)
                     for f in photo.faces)
        if len(batch) >= EMBED_CHUNK:
            flush()
    flush()
    return results, sheet, unreadable


def _sheet_rows(sheet: list, aligner) -> list:
    """The contact sheet's rows: each match shown by its best enrolled photo, aligned."""
    rows = []
    for label, crop, matches in sheet:
        shown = []
        for name, score, source in matches:
            try:
                face = aligner.align(read_image(source))
            except (ToolkitError, OSError):  # moved or deleted since it was enrolled
                face = None
            shown.append((name, score, None if face is None else face.crop))
        rows.append((label, crop, shown))
    return rows


def _print_table(results: dict[str, list]) -> None:
    width = max([len("photo")] + [len(p) for p in results])
    print(f"{'photo':<{width}}  {'box':<24}  {'identity':<20}  {'score':>6}  next matches")
    for photo, faces in results.items():
        if not faces:
            print(f"{photo:<{width}}  {'(no face)':<24}")
        for face in faces:
            box = "[" + ", ".join(f"{v:.0f}" for v in face["box"]) + "]"
            best = face["matches"][0]["score"] if face["matches"] else float("nan")
            rest = ", ".join(f"{m['identity']} {m['score']:.3f}"
                             for m in face["matches"][1:1 + TABLE_MATCHES])
            print(f"{photo:<{width}}  {box:<24}  {face['identity']:<20}  {best:>6.3f}  {rest}")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status. Bad input raises (ToolkitError, OSError):
    run_cli prints it as one line and exits 1."""
    args = build_parser().parse_args(argv)
    return _enrol(args) if args.command == "enrol" else _search(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
