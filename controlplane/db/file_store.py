"""SQL of uploaded files (OpenAI's files API)."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from controlplane import wire
from controlplane.db import tables as t
from controlplane.db.fine_tune_store import IN_FLIGHT
from controlplane.db.paging import after as after_cursor
from controlplane.db.paging import page
from controlplane.errors import Conflict, InvalidRequest, NotFound


def file_object(row: t.File) -> wire.FileObject:
    return wire.FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=int(row.created_at),
        filename=row.filename,
        purpose=row.purpose,
    )


def add_file(session: Session, row: t.File) -> wire.FileObject:
    session.add(row)
    return file_object(row)


def get_file(session: Session, file_id: str) -> t.File:
    row = session.get(t.File, file_id)
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
    return row


def list_files(
    session: Session, *, purpose: str | None, after: str | None, limit: int, descending: bool
) -> wire.Page:
    order = (
        (t.File.created_at.desc(), t.File.id.desc())
        if descending
        else (t.File.created_at, t.File.id)
    )
    query = select(t.File).order_by(*order).limit(limit + 1)
    if purpose is not None:
        query = query.where(t.File.purpose == purpose)
    if after is not None:
        cursor = session.get(t.File, after)
        if cursor is None:
            raise InvalidRequest(f"No such File object: {after}", param="after")
        query = query.where(after_cursor(t.File, cursor, descending))
    files = [file_object(r) for r in session.scalars(query)]
    return page(files, limit, lambda f: f.id)


def delete_file(session: Session, file_id: str) -> t.File:
    """Remove the row and return it (the caller removes the bytes). A file that an unfinished
    fine-tuning job still reads cannot go: a restart reads it again."""
    row = get_file(session, file_id)
    user = session.scalars(
        select(t.FineTune.id).where(
            t.FineTune.state.in_(IN_FLIGHT),
            or_(t.FineTune.training_file == file_id, t.FineTune.validation_file == file_id),
        )
    ).first()
    if user is not None:
        raise Conflict(f"file {file_id} is in use by fine-tuning job {user}", code="file_in_use")
    session.delete(row)
    return row
