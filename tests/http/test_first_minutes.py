"""Issue 17's rough edges, on a real server: what `show` reports of a created model, `list`
after a create, and the built-in Gemma 3 270M named and described as the base model it is."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime

import httpx
import pytest


def _shoal(url: str, home, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHOAL_HOST": url, "SHOAL_HOME": str(home), "SHOAL_NO_AUTOSTART": "1",
           "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "shoal", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def mine(shoal_server):
    """`mine`: FROM smollm2 (a name: pulled from the built-in source), a SYSTEM, a PARAMETER."""
    url = shoal_server.url
    created = httpx.post(url + "/api/create", timeout=300, json={
        "model": "mine", "from": "smollm2", "system": "Answer in French.",
        "parameters": {"temperature": 0}, "stream": False})
    assert created.status_code == 200, created.text
    yield "mine"
    httpx.request("DELETE", url + "/api/delete", json={"model": "mine"}, timeout=60)
    httpx.request("DELETE", url + "/api/delete", json={"model": "smollm2:latest"}, timeout=60)


def test_show_reports_what_a_modelfile_set_loaded_or_not(shoal_server, mine, tmp_path) -> None:
    url = shoal_server.url
    for loaded in (False, True):
        if loaded:   # a request loads it; show must still report the Modelfile's settings
            reply = httpx.post(url + "/api/generate", timeout=300, json={
                "model": mine, "prompt": "hi", "stream": False, "options": {"num_predict": 1}})
            assert reply.status_code == 200, reply.text
            assert "mine:latest" in [m["name"] for m in httpx.get(url + "/api/ps").json()["models"]]
        shown = httpx.post(url + "/api/show", json={"model": mine}, timeout=60).json()
        assert shown["system"] == "Answer in French."
        assert re.search(r'^SYSTEM (""")?Answer in French\.', shown["modelfile"], re.M), shown["modelfile"]
        assert "temperature" in shown["parameters"]
        assert shown["details"]["parent_model"] == "smollm2:latest"
        assert "im_start" in shown["template"]          # the model's own chat template
        assert shown["capabilities"][:2] == ["completion", "chat"]
    cli = _shoal(url, tmp_path, "show", mine, "--system")
    assert cli.returncode == 0 and cli.stdout.strip() == "Answer in French.", cli.stderr
    modelfile = _shoal(url, tmp_path, "show", mine, "--modelfile").stdout
    assert "SYSTEM" in modelfile and re.search(r"^PARAMETER temperature 0(\.0)?$", modelfile, re.M)


def test_list_after_create_is_fresh_and_has_no_shadowed_copy(shoal_server, mine) -> None:
    url = shoal_server.url
    httpx.post(url + "/api/generate", timeout=300, json={"model": mine, "prompt": "hi",
                                                         "stream": False, "options": {"num_predict": 1}})
    models = {m["name"]: m for m in httpx.get(url + "/api/tags").json()["models"]}
    # FROM smollm2 pulled smollm2:latest into the store, but `smollm2` means the served
    # smollm2:135m: the copy is unreachable by name, so it is not listed.
    assert "smollm2:latest" not in models and "smollm2:135m" in models
    created = datetime.fromisoformat(models["mine:latest"]["modified_at"].replace("Z", "+00:00"))
    assert abs(time.time() - created.timestamp()) < 600    # its manifest's time, not its blob's
    ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert "smollm2:latest" not in ids and "mine:latest" in ids


def test_the_builtin_gemma_is_the_pretrained_one_and_says_so(shoal_server, gemma3_path, tmp_path) -> None:
    url = shoal_server.url
    pulled = _shoal(url, tmp_path, "pull", "gemma3:270m-pt")   # from the cache: no download
    assert pulled.returncode == 0, pulled.stderr
    try:
        shown = httpx.post(url + "/api/show", json={"model": "gemma3:270m-pt"}, timeout=60).json()
        assert shown["capabilities"] == ["completion"]          # no "chat": a base model
        tags = {m["name"]: m for m in httpx.get(url + "/api/tags").json()["models"]}
        assert tags["gemma3:270m-pt"]["details"]["quantization_level"] == "Q4_K_M"
        assert "gemma3:270m:latest" not in tags and "gemma3:270m" not in tags
        run = _shoal(url, tmp_path, "run", "gemma3:270m-pt", "The capital of France is",
                     "--parameter", "num_predict", "3", "--parameter", "temperature", "0")
        assert run.returncode == 0, run.stderr
        assert "gemma3:270m-pt is a base (pretrained) model: it continues your text" in run.stderr
        ps = {m["name"]: m for m in httpx.get(url + "/api/ps").json()["models"]}
        assert ps["gemma3:270m-pt"]["details"]["quantization_level"] == "Q4_K_M"   # loaded: not F32
        smollm2 = _shoal(url, tmp_path, "run", "smollm2", "hi", "--parameter", "num_predict", "2")
        assert "base (pretrained)" not in smollm2.stderr
    finally:
        httpx.post(url + "/api/generate", json={"model": "gemma3:270m-pt", "keep_alive": 0}, timeout=60)
        httpx.request("DELETE", url + "/api/delete", json={"model": "gemma3:270m-pt"}, timeout=60)
