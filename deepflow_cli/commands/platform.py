"""`deepflow up`, `down` and `status`: the local control plane and node agent."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Annotated

import typer

from controlplane.wire import PlatformStatus
from deepflow_cli import columns, processes
from deepflow_cli.context import AppState, connect, state
from deepflow_cli.errors import CliError, ExitCode
from deepflow_cli.home import RunInfo, logs_dir
from deepflow_cli.options import JsonOpt, TimeoutOpt, WaitOpt
from deepflow_cli.output import render, reporting_errors, say, stderr, wait_for, warn
from deepflow_cli.processes import AGENT, CONTROL_PLANE

app = typer.Typer()

HostOpt = Annotated[str, typer.Option("--host", help="Address both processes listen on.")]
PortOpt = Annotated[int, typer.Option("--port", help="Control plane port.")]
AgentPortOpt = Annotated[int, typer.Option("--agent-port", help="Local node agent port.")]
ForegroundOpt = Annotated[
    bool, typer.Option("--foreground", help="Stay attached with logs here; Ctrl-C stops both.")
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="SQLAlchemy URL (default: SQLite in DEEPFLOW_HOME)."),
]

POLL_INTERVAL_S = 0.5


def _status(app_state: AppState, url: str) -> PlatformStatus | None:
    """The platform's status, or None while nothing answers at `url`."""
    try:
        with app_state.client(url) as client:
            return client.status()
    except CliError as exc:
        if exc.exit_code == ExitCode.UNREACHABLE:
            return None
        raise


def _agent_argv(url: str, host: str, agent_port: int) -> list[str]:
    return [
        sys.executable, "-m", "dataplane.agent", "--control-plane", url,
        "--host", host, "--port", str(agent_port), "--name", "local",
    ]  # fmt: skip


def _control_plane_argv(host: str, port: int, database_url: str | None) -> list[str]:
    argv = [sys.executable, "-m", "controlplane", "--host", host, "--port", str(port)]
    return argv + (["--database-url", database_url] if database_url else [])


def _wait_ready(
    app_state: AppState,
    url: str,
    procs: dict[processes.Service, subprocess.Popen[bytes]],
    timeout: float,
    *,
    spinner: bool,
) -> None:
    def poll() -> tuple[bool, str]:
        for service, proc in procs.items():
            if proc.poll() is not None:
                _stop_all()
                where = f"; see {service.log_file}" if spinner else ""
                raise CliError(f"the {service.name} exited with code {proc.returncode}{where}")
        status = _status(app_state, url)
        if status is None:
            return False, f"starting the control plane at {url}"
        if any(node.state == "ready" for node in status.nodes):
            return True, "ready"
        return False, "waiting for the local node agent to register"

    if not wait_for(poll, timeout=timeout, interval=POLL_INTERVAL_S, spinner=spinner):
        raise CliError(
            f"DeepFlow was not ready within {timeout:.0f} s; see {CONTROL_PLANE.log_file} and "
            f"{AGENT.log_file} (stop it with `deepflow down`)"
        )


def _stop_all() -> list[int]:
    stopped = []
    for service in (AGENT, CONTROL_PLANE):  # the agent first: it stops its instances
        with stderr.status(f"stopping the {service.name}"):
            pid = processes.stop(service)
        if pid is not None:
            stopped.append(pid)
    RunInfo.path().unlink(missing_ok=True)
    return stopped


def _already_up(app_state: AppState, url: str, agent_port: int, host: str) -> bool:
    """True when a control plane already answers; restarts a local agent that died."""
    pid = CONTROL_PLANE.running_pid()
    if pid is None:
        if any(p.exists() for p in (CONTROL_PLANE.pid_file, AGENT.pid_file, RunInfo.path())):
            processes.stop(AGENT)  # an agent orphaned by a crashed control plane
            processes.clear_run_files()
            say("removed stale pid files", style="dim")
        if _status(app_state, url) is not None:
            say(f"a control plane already answers at {url} (not started by `deepflow up`)")
            return True
        return False
    info = RunInfo.load()
    running_url = info.url if info is not None else url
    if _status(app_state, running_url) is None:
        raise CliError(
            f"the control plane (pid {pid}) does not answer at {running_url}; "
            f"see {CONTROL_PLANE.log_file} or run `deepflow down`"
        )
    if AGENT.running_pid() is None:
        agent = processes.spawn(
            AGENT, _agent_argv(running_url, host, agent_port), env=processes.child_env()
        )
        RunInfo(url=running_url, pid=pid, agent_pid=agent.pid).save()
        say(f"restarted the local node agent (pid {agent.pid})")
    say(f"DeepFlow is already running at {running_url} (pid {pid})")
    return True


def _foreground(
    app_state: AppState,
    url: str,
    procs: dict[processes.Service, subprocess.Popen[bytes]],
    timeout: float | None,
) -> None:
    """Wait (quietly: the children log to this terminal) until Ctrl-C; stop both on any exit."""
    try:
        if timeout is not None:
            _wait_ready(app_state, url, procs, timeout, spinner=False)
        say(f"DeepFlow is running at {url}; Ctrl-C stops it", style="green")
        while True:
            for service, proc in procs.items():
                if proc.poll() is not None:
                    raise CliError(f"the {service.name} exited with code {proc.returncode}")
            time.sleep(POLL_INTERVAL_S)
    except KeyboardInterrupt:
        say("stopping")
    finally:
        _stop_all()


@app.command()
def up(
    ctx: typer.Context,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8480,
    agent_port: AgentPortOpt = 8481,
    foreground: ForegroundOpt = False,
    database_url: DatabaseOpt = None,
    wait: WaitOpt = True,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Start the control plane and a local node agent (in the background unless --foreground)."""
    app_state = state(ctx)
    url = f"http://{host}:{port}"
    with reporting_errors():
        if _already_up(app_state, url, agent_port, host):
            return
        env = processes.child_env()
        log = not foreground
        control_plane = processes.spawn(
            CONTROL_PLANE, _control_plane_argv(host, port, database_url), env=env, log=log
        )
        agent = processes.spawn(AGENT, _agent_argv(url, host, agent_port), env=env, log=log)
        RunInfo(url=url, pid=control_plane.pid, agent_pid=agent.pid).save()
        procs = {CONTROL_PLANE: control_plane, AGENT: agent}
        if foreground:
            _foreground(app_state, url, procs, timeout if wait else None)
            return
        if wait:
            _wait_ready(app_state, url, procs, timeout, spinner=True)
        state_word = "running" if wait else "starting"
        say(f"DeepFlow is {state_word} at {url}", style="green")
        say(
            f"control plane pid {control_plane.pid}, agent pid {agent.pid}; logs in {logs_dir()}",
            style="dim",
        )


@app.command()
def down() -> None:
    """Stop the local node agent and control plane started by `deepflow up`."""
    with reporting_errors():
        had_files = any(p.exists() for p in (CONTROL_PLANE.pid_file, AGENT.pid_file))
        stopped = _stop_all()
        if stopped:
            say(f"stopped DeepFlow (pids {', '.join(map(str, stopped))})")
        elif had_files:
            say("DeepFlow is not running (removed stale pid files)")
        else:
            say("DeepFlow is not running")


@app.command()
def status(ctx: typer.Context, json_mode: JsonOpt = False) -> None:
    """Show the control plane, its nodes and deployments."""
    with connect(ctx) as client:
        platform = client.status()
    if json_mode:
        render(platform, [], json_mode=True)
        return
    say(f"DeepFlow {platform.version} at {platform.url}", style="bold")
    say(f"database {platform.database}, home {platform.home}", style="dim")
    render(platform.nodes, columns.NODE_LIST, False, title="nodes")
    render(platform.deployments, columns.DEPLOYMENT_LIST, False, title="deployments")
    if not any(node.state == "ready" for node in platform.nodes):
        warn("no node is ready; is the node agent running? (`deepflow up` starts one)")
