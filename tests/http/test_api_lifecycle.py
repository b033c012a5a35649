"""Model lifecycle over HTTP with the official ollama client: pull, create, show, on-demand
load and keep_alive, copy, delete — against a real `shoal serve` with its own empty store."""
from __future__ import annotations

import time

import httpx
import ollama
import pytest

PIRATE_SYSTEM = "You are a pirate captain. Always answer like a pirate, in one short sentence."
# As Ollama's ChatML-style templates do: the system prompt comes from .System (the request's
# system message or the Modelfile's SYSTEM), the other messages from .Messages.
CHATML = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
          "{{ range .Messages }}{{ if ne .Role \"system\" }}<|im_start|>{{ .Role }}\n{{ .Content }}"
          "<|im_end|>\n{{ end }}{{ end }}<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def shoal_server(smollm2_path, tmp_path_factory):
    """A server of its own: these tests fill its store, which other tests' listings must not see."""
    from live_server import LiveServer

    server = LiveServer(smollm2_path, "--served-model-name", "smollm2:135m,smollm2", "--max-model-len",
                        "2048", "--kv-cache-bytes", "128MiB",
                        log_path=tmp_path_factory.mktemp("lifecycle") / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(shoal_server) -> ollama.Client:
    return ollama.Client(host=shoal_server.url, timeout=300)


@pytest.fixture(scope="module")
def pulled(client) -> str:
    events = list(client.pull("smollm2", stream=True))
    assert events[-1].status == "success"
    assert any(e.total and e.completed == e.total for e in events)     # byte progress was reported
    return "smollm2:latest"


def loaded_names(client) -> list[str]:
    return [m.model for m in client.ps().models]


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_pull_lists_the_model_with_its_details(client, pulled) -> None:
    listed = {m.model: m for m in client.list().models}
    # "smollm2" is a name this server's --model answers to: the stored copy it shadows is not
    # listed beside it (issue 17), the served model is, once
    assert pulled not in listed
    entry = listed["smollm2:135m"]
    assert entry.size > 90_000_000 and len(entry.digest) == 64
    assert entry.details.family == "llama" and entry.details.quantization_level == "Q4_1"


def test_create_show_and_load_on_demand_with_keep_alive(client, pulled, shoal_server) -> None:
    events = list(client.create(model="pirate", from_=pulled, system=PIRATE_SYSTEM,
                                parameters={"temperature": 0, "num_predict": 6}, stream=True))
    assert events[-1].status == "success"
    shown = client.show("pirate")
    assert PIRATE_SYSTEM in shown.modelfile and "FROM" in shown.modelfile
    assert "num_predict" in shown.parameters
    assert httpx.post(shoal_server.url + "/api/show", json={"model": "pirate"}).json()["system"] == PIRATE_SYSTEM
    assert "pirate:latest" not in loaded_names(client)           # show does not load it

    reply = client.generate(model="pirate", prompt="Where is the treasure?", keep_alive="10m")
    assert reply.done and reply.eval_count <= 6                  # num_predict from the Modelfile
    assert reply.load_duration > 1_000_000                       # it had to load (> 1 ms)
    running = {m.model: m for m in client.ps().models}
    assert "pirate:latest" in running
    expires_in = running["pirate:latest"].expires_at.timestamp() - time.time()
    assert 500 < expires_in <= 600

    # the Modelfile SYSTEM is in the prompt the model saw
    tokens = httpx.post(shoal_server.url + "/tokenize", json={
        "model": "pirate", "messages": [{"role": "user", "content": "Where is the treasure?"}]}).json()
    text = httpx.post(shoal_server.url + "/detokenize", json={"model": "pirate",
                                                             "tokens": tokens["tokens"]}).json()["prompt"]
    assert PIRATE_SYSTEM in text
    chat = client.chat(model="pirate", messages=[{"role": "user", "content": "Where is the treasure?"}])
    assert chat.prompt_eval_count == tokens["count"]

    # keep_alive 0 unloads it as soon as it is idle; the next request loads it again
    client.generate(model="pirate", prompt="Ahoy", keep_alive=0)
    assert wait_until(lambda: "pirate:latest" not in loaded_names(client))
    client.generate(model="pirate", prompt="", keep_alive="1m")  # the empty prompt only loads
    assert wait_until(lambda: "pirate:latest" in loaded_names(client))
    client.generate(model="pirate", prompt="", keep_alive=0)     # ... or unloads
    assert wait_until(lambda: "pirate:latest" not in loaded_names(client))


def test_a_go_template_renders_like_the_models_own_chatml(client, pulled) -> None:
    client.create(model="chatml", from_=pulled, template=CHATML)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    options = {"temperature": 0, "num_predict": 8}
    go = client.chat(model="chatml", messages=messages, options=options, keep_alive=0)
    jinja = client.chat(model=pulled, messages=messages, options=options, keep_alive=0)
    assert go.prompt_eval_count == jinja.prompt_eval_count
    assert go.message.content == jinja.message.content


def test_copy_and_delete_keep_shared_blobs(client, pulled) -> None:
    quoted = 'Repeat what you hear, even """quoted""" text.'
    client.create(model="parrot", from_=pulled, system=quoted)
    assert httpx.post(client._client.base_url.join("/api/show"), json={"model": "parrot"}).json()["system"] == quoted
    client.copy("parrot", "parrot-copy")
    names = {m.model for m in client.list().models}
    assert {"parrot:latest", "parrot-copy:latest"} <= names
    client.delete("parrot-copy")
    client.delete("parrot")
    names = {m.model for m in client.list().models}
    assert "parrot:latest" not in names and "parrot-copy:latest" not in names
    # the weights they shared with smollm2 are still there: it still answers
    assert client.generate(model=pulled, prompt="Hi", options={"num_predict": 2}, keep_alive=0).done
    with pytest.raises(ollama.ResponseError) as info:
        client.delete("parrot")
    assert info.value.status_code == 404


def test_lifecycle_errors(client, shoal_server) -> None:
    with pytest.raises(ollama.ResponseError):
        client.pull("no-such-model-anywhere:7b")
    bad = httpx.post(shoal_server.url + "/api/create", json={
        "model": "broken", "modelfile": "FROM smollm2\nPARAMETER temperature hot\n", "stream": False})
    assert bad.status_code == 400
    assert "line 2" in bad.json()["error"]
    missing = httpx.post(shoal_server.url + "/api/create", json={"model": "x", "stream": False})
    assert missing.status_code == 400
    with pytest.raises(ollama.ResponseError) as info:
        client.show("never-created")
    assert info.value.status_code == 404


@pytest.fixture(scope="module")
def new_store_server(tiny_llama_gguf, tmp_path_factory):
    """A server of the tiny model whose store root does not exist yet (a fresh install's)."""
    from live_server import LiveServer

    root = tmp_path_factory.mktemp("new_store")
    server = LiveServer(tiny_llama_gguf, "--served-model-name", "tiny", "--max-model-len", "64",
                        env={"SHOAL_MODELS": str(root / "models")}, log_path=root / "serve.log")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _create_from_upload(server, gguf, name: str) -> ollama.Client:
    client = ollama.Client(host=server.url, timeout=120)
    digest = client.create_blob(gguf)
    assert client.create(model=name, files={gguf.name: digest}).status == "success"
    return client


def test_an_upload_can_be_the_first_write_to_a_new_store(new_store_server, tiny_llama_gguf) -> None:
    # found by tests/http/test_fuzz.py: the upload's temporary file went into a store root that
    # did not exist yet (a fresh install's ~/.shoal/models), a 500 for `ollama create` of a file
    client = _create_from_upload(new_store_server, tiny_llama_gguf, "uploaded")
    assert client.generate(model="uploaded", prompt="Hi", options={"num_predict": 2}).done


def test_ps_shows_a_keep_alive_past_year_9999_as_forever(new_store_server, tiny_llama_gguf) -> None:
    # found by tests/http/test_fuzz.py: keep_alive 1e12 s ends in the year ~33700, which no date
    # can hold; /api/ps answered 500 to everyone until the model unloaded
    client = _create_from_upload(new_store_server, tiny_llama_gguf, "long-lived")
    client.generate(model="long-lived", prompt="Hi", keep_alive=1e12, options={"num_predict": 1})
    reply = httpx.get(new_store_server.url + "/api/ps", timeout=30)
    assert reply.status_code == 200, reply.text
    expires = {m["name"]: m["expires_at"] for m in reply.json()["models"]}["long-lived:latest"]
    assert int(expires[:4]) >= 2300, expires        # the far future Ollama shows for "forever"
