"""`deepflow files ...` against a fake control plane: multipart upload, list/get/delete, content."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from cli_fakes import FakeApi, Invoke, error_reply
from fine_tune_fakes import file_object, page

from controlplane import wire
from deepflow_cli.client import DeepFlowClient
from deepflow_cli.errors import ExitCode

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
LINE = json.dumps({"messages": MESSAGES}).encode() + b"\n"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(LINE * 3)
    return path


def test_upload_sends_multipart_with_purpose_and_prints_the_id(
    api: FakeApi, cli: Invoke, dataset: Path
) -> None:
    api.on("POST", "/v1/files", file_object("file-new"))
    result = cli("files", "upload", str(dataset))
    assert result.exit_code == 0, result.output
    assert "file-new" in result.stdout and "train.jsonl" in result.stdout

    (sent,) = api.seen
    assert sent.headers["content-type"].startswith("multipart/form-data")
    body = sent.content
    assert b'name="purpose"\r\n\r\nfine-tune' in body
    assert b'name="file"; filename="train.jsonl"' in body
    assert LINE * 3 in body


def test_upload_json_and_purpose_option(api: FakeApi, cli: Invoke, dataset: Path) -> None:
    api.on("POST", "/v1/files", file_object("file-new"))
    result = cli("files", "upload", str(dataset), "--purpose", "batch", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "file-new"
    assert b'name="purpose"\r\n\r\nbatch' in api.seen[0].content


def test_upload_of_a_missing_path_fails_before_sending(api: FakeApi, cli: Invoke) -> None:
    result = cli("files", "upload", "/no/such/train.jsonl")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == "error: no file at /no/such/train.jsonl"
    assert api.seen == []


def test_upload_refused_prints_the_servers_line_numbered_error(
    api: FakeApi, cli: Invoke, dataset: Path
) -> None:
    api.on("POST", "/v1/files", error_reply(400, "line 2: messages must be a list"))
    result = cli("files", "upload", str(dataset))
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == "error: line 2: messages must be a list"
    assert result.stdout == ""


def test_upload_reports_progress_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_bytes(LINE * 4000)  # several multipart chunks
    fake = FakeApi()
    fake.on("POST", "/v1/files", file_object())
    calls: list[tuple[int, int]] = []
    client = DeepFlowClient("http://cp.test", transport=fake.transport())
    client.upload_file(path, "fine-tune", lambda done, total: calls.append((done, total)))
    size = path.stat().st_size
    assert len(calls) > 1 and calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_list_table_and_json(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/v1/files", page([file_object("file-2", "b.jsonl"), file_object("file-1")]))
    table = cli("files", "list")
    assert table.exit_code == 0, table.output
    assert "file-2" in table.stdout and "b.jsonl" in table.stdout and "2.0 KiB" in table.stdout

    data = json.loads(cli("files", "list", "--json").stdout)
    assert [f["id"] for f in data] == ["file-2", "file-1"]
    assert data[0]["purpose"] == "fine-tune"


def test_list_empty_says_so(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/v1/files", page([]))
    assert "no files" in cli("files", "list").stdout


def test_get_and_json(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/v1/files/file-abc", file_object())
    result = cli("files", "get", "file-abc")
    assert result.exit_code == 0, result.output
    assert "train.jsonl" in result.stdout and "processed" in result.stdout
    assert json.loads(cli("files", "get", "file-abc", "--json").stdout)["bytes"] == 2048


def test_get_unknown_exits_4(api: FakeApi, cli: Invoke) -> None:
    api.on("GET", "/v1/files/file-x", error_reply(404, "no file file-x"))
    result = cli("files", "get", "file-x")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: no file file-x"


def test_delete(api: FakeApi, cli: Invoke) -> None:
    api.on("DELETE", "/v1/files/file-abc", wire.FileDeleted(id="file-abc", deleted=True))
    result = cli("files", "delete", "file-abc")
    assert result.exit_code == 0 and "deleted file file-abc" in result.stdout
    assert json.loads(cli("files", "delete", "file-abc", "--json").stdout)["deleted"] is True


def test_delete_in_use_is_refused(api: FakeApi, cli: Invoke) -> None:
    api.on("DELETE", "/v1/files/file-abc", error_reply(409, "file-abc is used by ftjob-1"))
    result = cli("files", "delete", "file-abc")
    assert result.exit_code == ExitCode.ERROR
    assert result.stderr.strip() == "error: file-abc is used by ftjob-1"


def test_content_to_stdout_and_to_a_file(api: FakeApi, cli: Invoke, tmp_path: Path) -> None:
    api.on("GET", "/v1/files/file-abc/content", httpx.Response(200, content=LINE * 2))
    result = cli("files", "content", "file-abc")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == LINE * 2

    dest = tmp_path / "out" / "copy.jsonl"
    dest.parent.mkdir()
    result = cli("files", "content", "file-abc", "-o", str(dest))
    assert result.exit_code == 0, result.output
    assert dest.read_bytes() == LINE * 2
    assert list(dest.parent.iterdir()) == [dest]  # no .part left behind


def test_content_of_unknown_file_leaves_no_output_file(
    api: FakeApi, cli: Invoke, tmp_path: Path
) -> None:
    api.on("GET", "/v1/files/file-x/content", error_reply(404, "no file file-x"))
    dest = tmp_path / "copy.jsonl"
    result = cli("files", "content", "file-x", "--output", str(dest))
    assert result.exit_code == ExitCode.NOT_FOUND
    assert result.stderr.strip() == "error: no file file-x"
    assert list(tmp_path.iterdir()) == []


def test_unreachable_exits_3(api: FakeApi, cli: Invoke) -> None:
    api.unreachable = True
    result = cli("files", "list")
    assert result.exit_code == ExitCode.UNREACHABLE
    assert "deepflow up" in result.stderr
