"""The identity-folder layout ``<root>/<identity>/<image>`` listed as (paths, labels,
identity names) in one order, the one pre_process.py --pack and data_gen.py both use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils import IMAGE_EXTENSIONS, DatasetError, get_logger, list_images

log = get_logger("face.pre_process")


IDENTITY_DEPTH = 2  # images are root/<identity>/<image>: two path parts below the root


def list_identity_images(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """``(image paths, labels, identity names)`` for a tree ``root/identity/image``.

    Identities are the immediate subfolders holding at least one image file, sorted by name;
    their position in that order is the label (0 .. C-1). Folders without images are ignored
    (with a warning). Images at any other depth are refused (DatasetError saying what was
    found): an image directly in ``root`` belongs to no identity, and images in sub-folders
    would be merged into their top folder's identity, which packs several people as one
    label when ``root`` is one level too high."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder (expected {root}/<identity>/<image>)")
    by_depth: dict[int, list[Path]] = {}
    per_identity: dict[str, list[Path]] = {}
    empty = []
    root_parts = len(root.parts)  # an image's depth: its parts beyond the root's
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_dir():  # iterdir + is_dir: a symlinked identity folder counts
            images = list_images(entry)
            if not images:
                empty.append(entry.name)
                continue
            per_identity[entry.name] = images
            for path in images:
                by_depth.setdefault(len(path.parts) - root_parts, []).append(path)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            by_depth.setdefault(1, []).append(entry)
    if not by_depth:
        raise DatasetError(f"{root}: no images found in identity subfolders "
                           f"(expected {root}/<identity>/<image>)")
    if set(by_depth) != {IDENTITY_DEPTH}:
        raise DatasetError(_depth_problem(root, by_depth))
    if empty:
        log.warning("%s: %d folder(s) without images ignored, e.g. %s", root, len(empty),
                    empty[:3])
    paths: list[Path] = []
    labels: list[int] = []
    names = list(per_identity)
    for label, name in enumerate(names):
        paths.extend(per_identity[name])
        labels.extend([label] * len(per_identity[name]))
    return paths, np.asarray(labels, dtype=np.int64), names


def _depth_problem(root: Path, by_depth: dict[int, list[Path]]) -> str:
    """What was found instead of ``root/identity/image`` everywhere, and what to do."""
    found = "; ".join(f"{len(paths)} image(s) at depth {depth} (e.g. {paths[0]})"
                      for depth, paths in sorted(by_depth.items()))
    depths = set(by_depth)
    if depths == {1}:
        hint = (f"is {root} itself one identity's folder? Pack the folder above it, which "
                f"holds one folder per identity")
    elif 1 in depths:
        hint = f"images directly in {root} belong to no identity: move them into one"
    elif len(depths) == 1:  # all deeper: root is one level (or more) too high
        example = by_depth[min(depths)][0]
        top = root / example.relative_to(root).parts[0]
        hint = (f"each folder under {root} would merge the people of its sub-folders into "
                f"one identity: pack {top} instead?")
    else:
        deep = by_depth[max(depths)][0]
        identity = deep.relative_to(root).parts[0]
        hint = (f"images in sub-folders such as {deep.parent} would be merged into identity "
                f"{identity!r}: move them up into {root / identity}, or into folders of "
                f"their own if they are other people")
    return (f"{root}: images must be at depth {IDENTITY_DEPTH} ({root}/<identity>/<image>); "
            f"found {found}. {hint}")
