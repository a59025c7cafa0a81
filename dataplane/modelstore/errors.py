"""The model store's one exception tree.

    ModelStoreError            anything the model store refuses or fails to do
    +-- InvalidModelFolder     a folder that is not a usable Hugging Face model folder
    +-- UnknownPreset          create_random was given a preset name it does not know
    +-- UnknownSource          pull was given a source name it does not know
    +-- DestinationExists      the target folder is already there and not empty
    +-- DownloadFailed         pip could not fetch the wheel that carries a source

The CLI maps these to exit codes; nothing below the CLI turns them into anything else.
"""

from __future__ import annotations


class ModelStoreError(Exception):
    """Base of every error the model store raises on purpose."""


class InvalidModelFolder(ModelStoreError):
    """The folder is missing, incomplete or of an unsupported model type."""


class UnknownPreset(ModelStoreError):
    """No random-model preset of that name."""


class UnknownSource(ModelStoreError):
    """No pull source of that name."""


class DestinationExists(ModelStoreError):
    """The destination already holds something; the store never overwrites a model."""


class DownloadFailed(ModelStoreError):
    """pip download exited with an error."""
