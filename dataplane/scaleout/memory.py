"""What a process really costs in memory, from /proc/<pid>/smaps_rollup.

RSS counts every page a process maps, so N instances sharing one copy of the weights would add
up to N copies. PSS divides each shared page among the processes that map it (the sum over
processes is the true total); USS is what the process alone holds (what killing it frees).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MemoryUse:
    rss: int  # bytes
    pss: int
    uss: int  # private clean + private dirty
    shared: int  # shared clean + shared dirty

    def __add__(self, other: MemoryUse) -> MemoryUse:
        return MemoryUse(
            self.rss + other.rss,
            self.pss + other.pss,
            self.uss + other.uss,
            self.shared + other.shared,
        )


def memory_use(pid: int) -> MemoryUse:
    """Raises OSError when the process is gone (or not ours to read)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0]) * 1024
    return MemoryUse(
        rss=fields.get("Rss", 0),
        pss=fields.get("Pss", 0),
        uss=fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
        shared=fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
    )


def total_use(pids: list[int]) -> MemoryUse:
    total = MemoryUse(0, 0, 0, 0)
    for pid in pids:
        total = total + memory_use(pid)
    return total


def file_mapping_use(pid: int, path: str) -> MemoryUse:
    """The part of a process's memory that maps the file at `path` (from /proc/<pid>/smaps)."""
    names = ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Shared_Clean", "Shared_Dirty")
    totals = dict.fromkeys(names, 0)
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = len(head) == 6 and head[5].rstrip("\n") == path
                continue
            name, _, rest = line.partition(":")
            if inside and name in totals:
                totals[name] += int(rest.split()[0]) * 1024
    return MemoryUse(
        rss=totals["Rss"],
        pss=totals["Pss"],
        uss=totals["Private_Clean"] + totals["Private_Dirty"],
        shared=totals["Shared_Clean"] + totals["Shared_Dirty"],
    )
