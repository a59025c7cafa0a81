"""`python -m dataplane.scaleout.pod --control-fd N [--cache-dir DIR]`: a warm pod.

It starts model-agnostic: imports torch, transformers and the engine, brings up the device (on a
GPU it also maps and registers the entries of the node's DRAM cache, `registered_cache`), says
`ready` on its control socket and waits. Handed a start command (`protocol.StartCommand`), it
becomes that instance: loads the model (mapped from the node's DRAM cache when the cache holds
it, else from the folder) and serves FlowServe's HTTP protocol in this process until SIGTERM.
Handed a training task instead (`train`, with its stdout pipe as an fd), it becomes that task's
executor: the trainer runs in this process, its JSON lines on the pipe. An idle pod whose
launcher goes away (EOF) exits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from dataplane.flowserve.startup import process_started_at
from dataplane.scaleout.protocol import Channel, Message, StartCommand
from dataplane.scaleout.settings import default_cache_root


def main(argv: list[str] | None = None) -> int:
    pod_at = process_started_at()
    parser = argparse.ArgumentParser(prog="python -m dataplane.scaleout.pod", description=__doc__)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--cache-dir", default=None, help="the node's DRAM cache")
    args = parser.parse_args(argv)
    channel = Channel.from_fd(args.control_fd)

    from dataplane.scaleout import runtime

    runtime.warm_imports()
    runtime.init_device(args.cache_dir or default_cache_root())
    runtime_at = time.time()
    channel.send({"event": "ready", "pid": os.getpid(), "pod_at": pod_at, "runtime_at": runtime_at})
    message = channel.recv()
    if message is not None and message.get("op") == "train":
        return train(channel, message)
    if message is None or message.get("op") != "start":
        return 0  # the pool closed, or let this pod go
    command = StartCommand.from_json(message["start"])
    runtime.redirect_output(command.log_path, f"warm pod {os.getpid()}: {command.instance_id}")
    try:
        flags, config = runtime.prepare(command)
    except ValueError as exc:
        channel.send({"event": "error", "message": str(exc)})
        return 2
    if command.torch_threads is not None:
        import torch

        torch.set_num_threads(command.torch_threads)
    channel.send({"event": "starting"})
    channel.close()
    clock = runtime.clock_for(command, "warm_pod", pod_at, runtime_at)
    return runtime.serve(flags, config, clock)


def train(channel: Channel, message: Message) -> int:
    """Become a training task executor: stderr to the task's log, stdout the agent's pipe (the
    trainer's protocol), then the trainer's main in this process, as `python -m
    dataplane.training --spec SPEC` would run it; its exit code is this pod's."""
    fds = channel.take_fds()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        channel.send({"event": "error", "message": f"expected 1 stdout fd, got {len(fds)}"})
        return 2
    from dataplane.scaleout import runtime

    spec = str(message["spec"])
    runtime.redirect_output(
        str(message["log_path"]),
        f"warm pod {os.getpid()}: python -m dataplane.training --spec {spec}",
    )
    os.dup2(fds[0], 1)
    os.close(fds[0])
    channel.send({"event": "training"})
    channel.close()
    from dataplane.flowserve import registered_cache

    registered_cache.release()  # no entry of the cache is this task's: let the cache evict them
    from dataplane.training.__main__ import main as train_main

    return train_main(["--spec", spec])


if __name__ == "__main__":
    sys.exit(main())
