"""The CLI's one exception and its exit codes.

Everything below the commands (the client, the process helpers, the model store adapter) raises
`CliError`; `output.reporting_errors` turns it into one red line on stderr and the exit code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # the API refused the request, or the user asked for something impossible
    USAGE = 2  # bad command line (Typer's own code)
    UNREACHABLE = 3  # no control plane answers at the URL
    NOT_FOUND = 4  # the API answered 404
    INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """A failure to report in one line; `status` is the HTTP status, when there was one."""

    def __init__(
        self, message: str, exit_code: int = ExitCode.ERROR, *, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = int(exit_code)
        self.status = status
