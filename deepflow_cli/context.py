"""What the root command hands to every command: the `--url` choice and how to make a client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import typer

from deepflow_cli.client import DeepFlowClient
from deepflow_cli.home import resolve_url
from deepflow_cli.output import reporting_errors

ClientFactory = Callable[[str], DeepFlowClient]


@dataclass(slots=True)
class AppState:
    url: str | None = None
    client_factory: ClientFactory = DeepFlowClient

    def client(self, url: str | None = None) -> DeepFlowClient:
        return self.client_factory(url or resolve_url(self.url))


def state(ctx: typer.Context) -> AppState:
    found = ctx.find_object(AppState)
    return found if found is not None else AppState()


@contextmanager
def connect(ctx: typer.Context, url: str | None = None) -> Iterator[DeepFlowClient]:
    """A client for the command's body; failures inside become one error line and an exit code."""
    with reporting_errors(), state(ctx).client(url) as client:
        yield client
