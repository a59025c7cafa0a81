from __future__ import annotations

import sys

import pytest
from agent_fakes import make_start

from dataplane.agent.errors import InvalidStart
from dataplane.agent.launch import check_instance_id, engine_flags, flowserve_command


def test_flowserve_command() -> None:
    start = make_start("inst-1", "qwen", max_model_len=256, enforce_eager=True)
    assert flowserve_command(start, 9000) == [
        sys.executable,
        "-m",
        "dataplane.flowserve",
        "--model",
        "/models/m",
        "--port",
        "9000",
        "--host",
        "127.0.0.1",
        "--instance-id",
        "inst-1",
        "--model-name",
        "qwen",
        "--max-model-len",
        "256",
        "--enforce-eager",
    ]


def test_engine_flags_types() -> None:
    args = {
        "gpu_memory_utilization": 0.5,
        "enforce_eager": False,
        "skip": None,
        "cuda_graph_sizes": [1, 2, 4],
        "dtype": "bfloat16",
        "hf_overrides": {"a": 1},
    }
    assert engine_flags(args) == [
        "--gpu-memory-utilization",
        "0.5",
        "--no-enforce-eager",
        "--cuda-graph-sizes",
        "1",
        "2",
        "4",
        "--dtype",
        "bfloat16",
        "--hf-overrides",
        '{"a":1}',
    ]


@pytest.mark.parametrize(
    "args",
    [{"port": 1}, {"model": "x"}, {"Bad-Key": 1}, {"x; rm": 1}, {"sizes": []}, {"o": [{}]}],
)
def test_engine_flags_rejects(args: dict[str, object]) -> None:
    with pytest.raises(InvalidStart) as info:
        engine_flags(args)
    assert info.value.param is not None and info.value.param.startswith("engine_args.")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 129, "a b"])
def test_instance_id_must_be_a_file_name(bad: str) -> None:
    with pytest.raises(InvalidStart):
        check_instance_id(bad)


def test_instance_id_ok() -> None:
    check_instance_id("dep-a.0_1")


def test_the_role_reaches_flowserve_on_every_path() -> None:
    from dataplane.flowserve.__main__ import parse_args
    from dataplane.scaleout.protocol import StartCommand

    start = make_start("inst-p", "qwen").model_copy(update={"role": "prefill"})
    argv = flowserve_command(start, 9000)
    assert argv[argv.index("--role") + 1] == "prefill"
    assert "--role" not in flowserve_command(make_start("inst-c", "qwen"), 9000)  # colocated
    command = StartCommand.of(start, 9000, host="127.0.0.1", log_path="/l", requested_at=1.0)
    assert StartCommand.from_json(command.to_json()) == command
    assert parse_args(command.flowserve_argv()).role == "prefill"
    with pytest.raises(InvalidStart):
        engine_flags({"role": "decode"})  # set by the agent from the start request


def test_semi_pd_reaches_flowserve_on_every_path() -> None:
    from controlplane.wire import InstanceStart, SemiPDConfig
    from dataplane.flowserve.__main__ import engine_config, parse_args
    from dataplane.scaleout.protocol import StartCommand

    config = SemiPDConfig(slo_ttft_ms=250.5, slo_tpot_ms=40, split=30, static=True)
    start = make_start("inst-s", "qwen").model_copy(update={"semi_pd": config})
    start = InstanceStart.model_validate_json(start.model_dump_json())  # over the wire
    assert start.semi_pd == config
    cold = parse_args(flowserve_command(start, 9000)[3:])
    command = StartCommand.of(start, 9000, host="127.0.0.1", log_path="/l", requested_at=1.0)
    assert StartCommand.from_json(command.to_json()) == command  # warm pods and zygotes
    in_process = parse_args(command.flowserve_argv())
    for args in (cold, in_process):
        assert (args.semi_pd, args.slo_ttft_ms, args.slo_tpot_ms) == (True, 250.5, 40.0)
        assert (args.semi_pd_split, args.semi_pd_static, args.role) == (30, True, "colocated")
        assert engine_config(args).semi_pd
    dynamic = start.model_copy(update={"semi_pd": SemiPDConfig(slo_ttft_ms=1, slo_tpot_ms=2)})
    args = parse_args(flowserve_command(dynamic, 9000)[3:])
    assert (args.semi_pd_split, args.semi_pd_static) == (50, False)  # FlowServe's defaults
    plain = flowserve_command(make_start("inst-c", "qwen"), 9000)
    assert not any(flag.startswith("--semi-pd") or flag.startswith("--slo") for flag in plain)
    for reserved in ("semi_pd", "slo_ttft_ms", "semi_pd_split"):
        with pytest.raises(InvalidStart):
            engine_flags({reserved: 1})  # set by the agent from the start request
