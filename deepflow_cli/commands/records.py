"""Read-only views of the control plane's records: requests, jobs, tasks, nodes, instances.

Each noun is its own sub-app with `list` and `get`; `get` on a request, job or task also shows the
state-change events of it and everything inside it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from controlplane.wire import JobInfo, RequestInfo, TaskInfo
from deepflow_cli import columns
from deepflow_cli.context import connect
from deepflow_cli.options import JsonOpt, LimitOpt, StateOpt
from deepflow_cli.output import Column, render

requests_app = typer.Typer(help="Requests (one per API call) and their events.")
jobs_app = typer.Typer(help="Jobs (the work a request makes) and their events.")
tasks_app = typer.Typer(help="Tasks (a job's units on instances) and their events.")
nodes_app = typer.Typer(help="Nodes (machines running a node agent).")
instances_app = typer.Typer(help="Instances (FlowServe processes serving a deployment).")

IdArg = Annotated[str, typer.Argument(help="Record id.")]


def _show(record: RequestInfo | JobInfo | TaskInfo, fields: list[Column]) -> None:
    render(record, fields, False)
    if isinstance(record, RequestInfo):
        render(record.jobs, columns.JOB_LIST, False, title="jobs")
        tasks = [task for job in record.jobs for task in job.tasks]
        render(tasks, columns.TASK_LIST, False, title="tasks")
    elif isinstance(record, JobInfo):
        render(record.tasks, columns.TASK_LIST, False, title="tasks")
    render(columns.all_events(record), columns.EVENT, False, title="events")


@requests_app.command("list")
def list_requests(
    ctx: typer.Context, limit: LimitOpt = 20, state: StateOpt = None, json_mode: JsonOpt = False
) -> None:
    """List recent requests."""
    with connect(ctx) as client:
        found = client.list_requests(state=state, limit=limit)
    render(found, columns.REQUEST_LIST, json_mode, title="requests")


@requests_app.command("get")
def get_request(ctx: typer.Context, request_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Show a request with its jobs, tasks and events."""
    with connect(ctx) as client:
        record = client.get_request(request_id)
    if json_mode:
        render(record, [], json_mode)
    else:
        _show(record, columns.REQUEST)


@jobs_app.command("list")
def list_jobs(
    ctx: typer.Context,
    limit: LimitOpt = 20,
    state: StateOpt = None,
    request_id: Annotated[str | None, typer.Option("--request", help="Jobs of this request.")] = (
        None
    ),
    json_mode: JsonOpt = False,
) -> None:
    """List recent jobs."""
    with connect(ctx) as client:
        found = client.list_jobs(request_id=request_id, state=state, limit=limit)
    render(found, columns.JOB_LIST, json_mode, title="jobs")


@jobs_app.command("get")
def get_job(ctx: typer.Context, job_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Show a job with its tasks and events."""
    with connect(ctx) as client:
        record = client.get_job(job_id)
    if json_mode:
        render(record, [], json_mode)
    else:
        _show(record, columns.JOB)


@tasks_app.command("list")
def list_tasks(
    ctx: typer.Context,
    limit: LimitOpt = 20,
    state: StateOpt = None,
    job_id: Annotated[str | None, typer.Option("--job", help="Tasks of this job.")] = None,
    json_mode: JsonOpt = False,
) -> None:
    """List recent tasks."""
    with connect(ctx) as client:
        found = client.list_tasks(job_id=job_id, state=state, limit=limit)
    render(found, columns.TASK_LIST, json_mode, title="tasks")


@tasks_app.command("get")
def get_task(ctx: typer.Context, task_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Show a task and its events."""
    with connect(ctx) as client:
        record = client.get_task(task_id)
    if json_mode:
        render(record, [], json_mode)
    else:
        _show(record, columns.TASK)


@nodes_app.command("list")
def list_nodes(
    ctx: typer.Context, limit: LimitOpt = 100, state: StateOpt = None, json_mode: JsonOpt = False
) -> None:
    """List nodes."""
    with connect(ctx) as client:
        found = client.list_nodes(state=state, limit=limit)
    render(found, columns.NODE_LIST, json_mode, title="nodes")


@nodes_app.command("get")
def get_node(ctx: typer.Context, node_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Show a node."""
    with connect(ctx) as client:
        record = client.get_node(node_id)
    render(record, columns.NODE, json_mode)


@instances_app.command("list")
def list_instances(
    ctx: typer.Context,
    limit: LimitOpt = 100,
    state: StateOpt = None,
    deployment: Annotated[
        str | None, typer.Option("--deployment", help="Instances of this deployment.")
    ] = None,
    json_mode: JsonOpt = False,
) -> None:
    """List instances."""
    with connect(ctx) as client:
        found = client.list_instances(deployment=deployment, state=state, limit=limit)
    render(found, columns.INSTANCE_LIST, json_mode, title="instances")


@instances_app.command("get")
def get_instance(ctx: typer.Context, instance_id: IdArg, json_mode: JsonOpt = False) -> None:
    """Show an instance."""
    with connect(ctx) as client:
        record = client.get_instance(instance_id)
    render(record, columns.INSTANCE, json_mode)
