"""How an `InstanceStart` becomes a command line: pure functions, no processes."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from typing import Any

from controlplane.wire import InstanceStart, SemiPDConfig
from dataplane.agent.errors import InvalidStart

# Called with the start request and the port chosen for it; returns argv.
CommandFor = Callable[[InstanceStart, int], list[str]]

# The id names the log file, so it must be a plain file name.
INSTANCE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENGINE_ARG_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Flags the agent sets itself; engine_args may not override them.
RESERVED_FLAGS = frozenset(
    {
        "model",
        "port",
        "host",
        "instance_id",
        "model_name",
        "role",
        "semi_pd",
        "slo_ttft_ms",
        "slo_tpot_ms",
        "semi_pd_split",
        "semi_pd_static",
    }
)


def check_start(start: InstanceStart) -> None:
    """Raise `InvalidStart` for an id that is not a file name or engine args that are not flags."""
    check_instance_id(start.instance_id)
    engine_flags(start.engine_args)


def check_instance_id(instance_id: str) -> None:
    if not INSTANCE_ID_PATTERN.match(instance_id):
        raise InvalidStart(
            "instance_id must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit",
            param="instance_id",
        )


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """`{"max_model_len": 256, "enforce_eager": True}` -> `--max-model-len 256 --enforce-eager`.

    True gives a bare flag, False `--no-<flag>` (argparse's BooleanOptionalAction), None is left
    out, a list gives the flag once followed by every item (nargs), a dict is passed as JSON.
    """
    flags: list[str] = []
    for key, value in engine_args.items():
        param = f"engine_args.{key}"
        if not ENGINE_ARG_PATTERN.match(key):
            raise InvalidStart(f"engine argument {key!r} is not a valid name", param=param)
        if key in RESERVED_FLAGS:
            raise InvalidStart(f"engine argument {key!r} is set by the node agent", param=param)
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (int, float, str)):
            flags += [flag, str(value)]
        elif isinstance(value, list):
            if not value or not all(isinstance(v, (int, float, str)) for v in value):
                raise InvalidStart(
                    f"engine argument {key!r} must be a non-empty list of scalars", param=param
                )
            flags += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            raise InvalidStart(f"engine argument {key!r} has an unsupported type", param=param)
    return flags


def semi_pd_flags(config: SemiPDConfig | None) -> list[str]:
    """FlowServe's semi-PD flags for an instance of a semi-pd deployment; none otherwise."""
    if config is None:
        return []
    flags = ["--semi-pd", "--slo-ttft-ms", str(config.slo_ttft_ms)]
    flags += ["--slo-tpot-ms", str(config.slo_tpot_ms)]
    if config.split is not None:
        flags += ["--semi-pd-split", str(config.split)]
    if config.static:
        flags.append("--semi-pd-static")
    return flags


def flowserve_command(start: InstanceStart, port: int, host: str = "127.0.0.1") -> list[str]:
    """The argv of a FlowServe instance: `python -m dataplane.flowserve ...`; `--role` only for
    an instance of a prefill or decode group (colocated is FlowServe's default), the semi-PD
    flags only for an instance of a semi-pd deployment."""
    role = [] if start.role == "colocated" else ["--role", start.role]
    return [
        sys.executable,
        "-m",
        "dataplane.flowserve",
        "--model",
        start.model_path,
        "--port",
        str(port),
        "--host",
        host,
        "--instance-id",
        start.instance_id,
        "--model-name",
        start.model,
        *role,
        *semi_pd_flags(start.semi_pd),
        *engine_flags(start.engine_args),
    ]
