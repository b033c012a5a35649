"""`shoal create` reads the Modelfile's local files itself and uploads them, so it works against a
server that reads nothing of its own disk (SHOAL_ALLOW_LOCAL_PATHS=0, keys on): GGUF files, model
directories of symlinks (as a Hugging Face cache snapshot is), PEFT adapters; and its errors
still point at the Modelfile's line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from live_server import LiveServer

ADMIN_KEY = "cli-create-admin-key-0123456789"


@pytest.fixture(scope="module")
def server(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("cli-create")
    live = LiveServer(tiny_llama_gguf, "--max-model-len", "256", "--kv-cache-bytes", "16MiB",
                      env={"SHOAL_MODELS": str(root / "models"), "SHOAL_HOME": str(root / "home"),
                           "SHOAL_AUTH": "on", "SHOAL_ADMIN_KEY": ADMIN_KEY,
                           "SHOAL_ALLOW_LOCAL_PATHS": "0"},
                      log_path=root / "serve.log")
    try:
        yield live.wait_ready()
    finally:
        live.stop()


def shoal(*args: str, server: LiveServer, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHOAL_HOST": server.url, "SHOAL_HOME": str(cwd / ".home"),
           "SHOAL_NO_AUTOSTART": "1", "SHOAL_API_KEY": ADMIN_KEY, "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "shoal", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=240, stdin=subprocess.DEVNULL, check=False)


def show(server: LiveServer, model: str) -> dict:
    reply = httpx.post(server.url + "/api/show", json={"model": model}, timeout=60,
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 200, reply.text
    return reply.json()


def write_peft(directory: Path) -> Path:
    directory.mkdir(parents=True)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
              str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return directory


def test_create_uploads_a_gguf_and_an_adapter(server, tiny_llama_gguf, tmp_path) -> None:
    (tmp_path / "weights.gguf").symlink_to(tiny_llama_gguf)
    write_peft(tmp_path / "adapter")
    (tmp_path / "Modelfile").write_text("FROM ./weights.gguf\nADAPTER ./adapter\nSYSTEM tiny\n")
    created = shoal("create", "cli-tiny", server=server, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert created.stderr.splitlines()[-1] == "success"
    shown = show(server, "cli-tiny")
    assert shown["system"] == "tiny" and "ADAPTER " in shown["modelfile"]
    # the same files again: the server has them, nothing is uploaded twice
    again = shoal("create", "cli-tiny-2", server=server, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_create_uploads_a_directory_of_symlinks(server, tiny_llama_dir, tmp_path) -> None:
    """A model directory whose files are symlinks (a Hugging Face cache snapshot): the server
    would refuse to read it from its own disk; read here, it is just the user's files."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for file in tiny_llama_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    (snapshot / "notes.json").write_text("{}")             # not a model file: not sent
    (tmp_path / "Modelfile").write_text("FROM ./snapshot\n")
    created = shoal("create", "cli-hf", server=server, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert show(server, "cli-hf")["details"]["format"] == "safetensors"


@pytest.mark.parametrize("modelfile, fragment", [
    ("FROM ./weights.gguf\n# the adapter\nADAPTER ./missing-dir\n", "no such file or directory"),
    ("FROM ./weights.gguf\n# the adapter\nADAPTER ./empty\n", "not a PEFT adapter directory"),
    ("FROM ./weights.gguf\n# the adapter\nADAPTER ./garbage.safetensors\n",
     "neither a GGUF nor a safetensors file"),
])
def test_create_errors_point_at_the_line(server, tiny_llama_gguf, tmp_path, modelfile,
                                         fragment) -> None:
    (tmp_path / "weights.gguf").symlink_to(tiny_llama_gguf)
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "Modelfile").write_text(modelfile)
    result = shoal("create", "cli-bad", server=server, cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("shoal: ") and "Traceback" not in result.stderr
    assert "line 3, column 9" in last and fragment in last, last
