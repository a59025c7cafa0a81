"""Base classes of every wire model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# ---------------------------------------------------------------------------------------------
# Base classes
# ---------------------------------------------------------------------------------------------


class Strict(BaseModel):
    """A request body: unknown fields are rejected, as OpenAI rejects them."""

    model_config = ConfigDict(extra="forbid")


class Open(BaseModel):
    """A response body or a report: unknown fields are ignored, so older readers keep working."""

    model_config = ConfigDict(extra="ignore")
