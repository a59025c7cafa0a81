"""Write a model folder beside its destination, then rename it into place.

A rename within one file system is atomic, so a crash or an error part-way leaves either no
destination or a complete one, never a half-written folder that would later look valid.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import DestinationExists


@dataclass(slots=True, frozen=True)
class Staging:
    model: Path  # becomes the destination on success
    scratch: Path  # working files (downloads, extracted archives); always deleted


def check_destination(dest: Path) -> None:
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise DestinationExists(f"{dest} already exists and is not an empty directory")


@contextmanager
def staged(dest: Path) -> Iterator[Staging]:
    check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        staging = Staging(model=root / "model", scratch=root / "scratch")
        staging.model.mkdir()
        staging.scratch.mkdir()
        yield staging
        # Checked again: the work can take minutes and someone may have created dest meanwhile.
        check_destination(dest)
        _make_readable(staging.model)
        if dest.exists():
            dest.rmdir()  # empty (just checked); os.rename onto a directory is not portable
        staging.model.rename(dest)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _make_readable(folder: Path) -> None:
    # safetensors writes through a private temporary file (mode 0600); the node agent and
    # FlowServe may run as another user and must be able to read the model.
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
