"""OpenAI's files API: /v1/files. The bytes live at $DEEPFLOW_HOME/files/<id>.

A `fine-tune` file must be chat-format JSONL (`controlplane/chat_jsonl.py`); it is checked at
upload, and a bad one is refused with the problems and their line numbers.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import typing
from collections.abc import Callable
from pathlib import Path

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from controlplane import wire
from controlplane.api.paging import after_of, limit_of
from controlplane.chat_jsonl import check_file
from controlplane.db import file_store
from controlplane.db import tables as t
from controlplane.db.session import Database
from controlplane.errors import InvalidRequest
from controlplane.jobs.chat_run import new_id
from controlplane.settings import Settings

PURPOSES = frozenset(typing.get_args(wire.FilePurpose))
FORM_SLACK_BYTES = 64 * 1024  # multipart framing around the file
MAX_LIST = 10_000


def _copy(source: typing.BinaryIO, dest: Path, max_bytes: int) -> int:
    """Write the upload to `dest`; the size, or InvalidRequest past `max_bytes`."""
    source.seek(0)
    with dest.open("wb") as out:
        shutil.copyfileobj(source, out, length=1 << 20)
        size = out.tell()
    if size > max_bytes:
        raise InvalidRequest(
            f"File is too large: {size} bytes; the limit is {max_bytes} bytes",
            param="file",
            code="file_too_large",
        )
    return size


class FilesRoutes:
    def __init__(self, *, settings: Settings, db: Database, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list, methods=["GET"]),
            Route("/v1/files/{id}", self.retrieve, methods=["GET"]),
            Route("/v1/files/{id}", self.delete, methods=["DELETE"]),
            Route("/v1/files/{id}/content", self.content, methods=["GET"]),
        ]

    async def upload(self, request: Request) -> Response:
        limit = self.settings.max_file_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + FORM_SLACK_BYTES:
            raise InvalidRequest(
                f"File is too large; the limit is {limit} bytes",
                param="file",
                code="file_too_large",
            )
        async with request.form(max_files=1, max_fields=8) as form:
            upload = form.get("file")
            purpose = form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("Missing required parameter: 'file'.", param="file")
            if not isinstance(purpose, str) or not purpose:
                raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
            if purpose not in PURPOSES:
                known = ", ".join(sorted(PURPOSES))
                raise InvalidRequest(
                    f"Invalid value for 'purpose': {purpose!r}; expected one of {known}",
                    param="purpose",
                    code="invalid_value",
                )
            file_id = new_id("file")
            folder = self.settings.files_dir
            folder.mkdir(parents=True, exist_ok=True)
            part = folder / f".{file_id}.part"
            try:
                size = await asyncio.to_thread(_copy, upload.file, part, limit)
                num_examples = None
                if purpose == "fine-tune":
                    check = await asyncio.to_thread(check_file, part)
                    if not check.ok:
                        raise InvalidRequest(
                            f"Invalid file format for fine-tuning: {check.describe()}",
                            param="file",
                            code="invalid_file_format",
                        )
                    num_examples = check.num_examples
                path = folder / file_id
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)
            row = t.File(
                id=file_id,
                filename=Path(upload.filename or "upload").name,
                purpose=purpose,
                bytes=size,
                path=str(path),
                num_examples=num_examples,
                created_at=self.clock(),
            )
        info = await self.db.run(lambda s: file_store.add_file(s, row))
        return JSONResponse(info.model_dump(mode="json"))

    async def list(self, request: Request) -> Response:
        limit = limit_of(request, default=MAX_LIST, maximum=MAX_LIST)
        after = after_of(request)
        purpose = request.query_params.get("purpose") or None
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest("Invalid value for 'order': expected asc or desc", param="order")
        page = await self.db.run(
            lambda s: file_store.list_files(
                s, purpose=purpose, after=after, limit=limit, descending=order == "desc"
            )
        )
        return JSONResponse(page.model_dump(mode="json"))

    async def retrieve(self, request: Request) -> Response:
        file_id = request.path_params["id"]
        info = await self.db.run(lambda s: file_store.file_object(file_store.get_file(s, file_id)))
        return JSONResponse(info.model_dump(mode="json"))

    async def content(self, request: Request) -> Response:
        file_id = request.path_params["id"]
        row = await self.db.run(lambda s: file_store.get_file(s, file_id))
        return FileResponse(row.path, media_type="application/octet-stream")

    async def delete(self, request: Request) -> Response:
        file_id = request.path_params["id"]
        row = await self.db.run(lambda s: file_store.delete_file(s, file_id))
        Path(row.path).unlink(missing_ok=True)
        return JSONResponse(wire.FileDeleted(id=file_id, deleted=True).model_dump(mode="json"))
