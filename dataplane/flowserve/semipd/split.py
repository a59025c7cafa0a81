"""From a prefill share (percent) to the compute units each worker runs on."""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.flowserve.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Split:
    prefill_share: int  # percent of the device's compute; decode has the rest
    prefill_units: int  # threads on a host, SMs on a GPU
    decode_units: int


def split_units(total: int, granularity: int, prefill_share: int) -> Split:
    """Prefill gets `prefill_share` percent of `total` units rounded to a multiple of
    `granularity`, decode what is left (rounded down: on an H100's 132 SMs in groups of 8, 4 SMs
    stay idle), each at least `granularity`. A device too small to split gives both workers all of
    it: they share it as two streams (threads) of one process would."""
    if total < 1 or granularity < 1:
        raise ConfigError("a split needs at least one unit and a granularity of at least one")
    if not 0 < prefill_share < 100:
        raise ConfigError(f"the prefill share is a percent in (0, 100), not {prefill_share}")
    if total < 2 * granularity:
        return Split(prefill_share, total, total)
    usable = total // granularity * granularity
    prefill = round(total * prefill_share / 100 / granularity) * granularity
    prefill = min(max(prefill, granularity), usable - granularity)
    decode = (total - prefill) // granularity * granularity
    return Split(prefill_share, prefill, decode)
