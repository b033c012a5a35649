"""`create` from GGUF files, stored models and HF directories; adapters; resolve -> loader; show."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file

from shoal.core.errors import CorruptModelError, PermissionDeniedError, UnknownModelError
from shoal.model.loader import open_model
from shoal.store import ModelStore, parse_modelfile
from shoal.store.create import GENERIC_PATH_PROBLEM, LocalPaths
from shoal.store.errors import ModelfileError
from shoal.store.manifests import MEDIA_MODEL_FILE

SMOL_MODELFILE = '''FROM {path}
PARAMETER temperature 0.4
PARAMETER num_ctx 2048
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|im_start|>"
TEMPLATE """{{{{ if .System }}}}<|im_start|>system
{{{{ .System }}}}<|im_end|>
{{{{ end }}}}<|im_start|>user
{{{{ .Prompt }}}}<|im_end|>
<|im_start|>assistant
"""
SYSTEM You are a terse assistant.
MESSAGE user Hello
MESSAGE assistant """Hi.
What do you need?"""
LICENSE Apache-2.0
'''


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def write_gguf_lora(path: Path) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_peft_lora(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "adapter_model.safetensors"
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
              str(path))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return path


def test_create_from_the_real_smollm2_gguf(store: ModelStore, smollm2_path: Path) -> None:
    events: list[dict] = []
    stored = store.create("smol-chat", SMOL_MODELFILE.format(path=smollm2_path),
                          progress=events.append)
    assert stored.name == "smol-chat:latest"
    assert stored.details.format == "gguf" and stored.details.family == "llama"
    assert stored.details.quantization_level == "Q4_1"
    assert stored.details.parameter_size.endswith("M")
    assert events[0] == {"status": "parsing modelfile"}
    assert events[-2:] == [{"status": "writing manifest"}, {"status": "success"}]
    copying = [e for e in events if e["status"].startswith("copying file")]
    assert copying[-1]["completed"] == copying[-1]["total"] == smollm2_path.stat().st_size

    resolved = store.resolve("SMOL-CHAT")
    assert resolved.format == "gguf"
    assert resolved.weights.name == "sha256-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert resolved.params == {"temperature": 0.4, "num_ctx": 2048,
                               "stop": ["<|im_end|>", "<|im_start|>"]}
    assert resolved.template.startswith("{{ if .System }}<|im_start|>system\n")
    assert resolved.system == "You are a terse assistant."
    assert resolved.messages == [{"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": "Hi.\nWhat do you need?"}]
    assert resolved.licenses == ["Apache-2.0"] and resolved.adapters == []
    assert resolved.digest == stored.digest
    with open_model(resolved.weights) as source:          # the loader opens the blob as is
        assert source.format == "gguf"
        assert source.config.architecture == "llama" and source.config.num_layers == 30
        assert "model.embed_tokens.weight" in source.weight_names()


def test_show_renders_a_modelfile_that_parses_back(store: ModelStore, smollm2_path: Path) -> None:
    store.create("smol-chat", SMOL_MODELFILE.format(path=smollm2_path))
    shown = store.show("smol-chat")
    reparsed = parse_modelfile(shown.modelfile)
    original = parse_modelfile(SMOL_MODELFILE.format(path=smollm2_path))
    assert reparsed.base == str(store.resolve("smol-chat").weights)
    original.base = reparsed.base
    assert reparsed == original
    assert "# FROM smol-chat:latest" in shown.modelfile
    assert shown.parameters.splitlines()[0].startswith("num_ctx")
    assert shown.system == "You are a terse assistant." and shown.license == "Apache-2.0"
    assert shown.model_info["general.architecture"] == "llama"
    assert shown.model_info.get("tokenizer.ggml.tokens", "absent") is None   # long arrays elided
    body = shown.to_json()
    assert body["details"]["quantization_level"] == "Q4_1" and "modelfile" in body
    # a new model created from the shown Modelfile is the same model
    store.create("again", shown.modelfile)
    assert store.resolve("again").params == store.resolve("smol-chat").params


def test_create_from_a_stored_model_inherits_and_overrides(store: ModelStore,
                                                          tiny_llama_gguf: Path) -> None:
    store.create("base", f'''FROM {tiny_llama_gguf}
TEMPLATE base template
SYSTEM base system
PARAMETER temperature 0.5
PARAMETER stop "X"
PARAMETER top_k 10
MESSAGE user base message
LICENSE base license
''')
    store.create("child", '''FROM base
SYSTEM child system
PARAMETER stop "Y"
PARAMETER stop "Z"
PARAMETER seed 7
LICENSE child license
''')
    base, child = store.resolve("base"), store.resolve("child")
    assert child.weights == base.weights                  # same blob, not a copy
    assert child.template == "base template"              # inherited
    assert child.system == "child system"                 # replaced
    assert child.params == {"temperature": 0.5, "top_k": 10, "stop": ["Y", "Z"], "seed": 7}
    assert child.messages == [{"role": "user", "content": "base message"}]
    assert child.licenses == ["base license", "child license"]
    assert base.system == "base system" and base.params["stop"] == ["X"]   # base untouched
    # an empty TEMPLATE / SYSTEM removes the inherited one; MESSAGE replaces the list
    store.create("grandchild", 'FROM child:latest\nTEMPLATE ""\nSYSTEM ""\nMESSAGE user new\n')
    grand = store.resolve("grandchild")
    assert grand.template is None and grand.system is None
    assert grand.messages == [{"role": "user", "content": "new"}]
    assert grand.params == child.params
    # re-creating a model under its own name from itself works (the base is read first)
    store.create("child", "FROM child\nSYSTEM changed\n")
    assert store.resolve("child").system == "changed"
    assert sorted(m.name for m in store.list()) == ["base:latest", "child:latest",
                                                    "grandchild:latest"]


def test_create_from_a_hf_directory(store: ModelStore, tiny_llama_dir: Path,
                                    tmp_path: Path) -> None:
    modelfile_dir = tmp_path / "project"
    modelfile_dir.mkdir()
    rel = os.path.relpath(tiny_llama_dir, modelfile_dir)
    stored = store.create("tiny-hf", f"FROM {rel}\nSYSTEM from a directory\n",
                          base_dir=modelfile_dir)
    assert stored.details.format == "safetensors" and stored.details.family == "llama"
    assert stored.details.quantization_level == "F32"
    resolved = store.resolve("tiny-hf")
    assert resolved.format == "safetensors" and resolved.weights.is_dir()
    names = sorted(p.name for p in resolved.weights.iterdir())
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    for link in resolved.weights.iterdir():               # links into the blob store
        assert link.is_symlink() and link.resolve().parent == store.blobs.dir
        assert link.read_bytes() == (tiny_llama_dir / link.name).read_bytes()
    manifest = json.loads(store.manifests.find(resolved.model).read_text())
    assert {layer["mediaType"] for layer in manifest["layers"][:-1]} == {MEDIA_MODEL_FILE}
    with open_model(resolved.weights) as source:
        assert source.format == "hf"
        expected = open_model(tiny_llama_dir)
        assert source.weight_names() == expected.weight_names()
        expected.close()
    # the directory is rebuilt on demand and removed with the last model using it
    assert store.resolve("tiny-hf").weights == resolved.weights
    store.delete("tiny-hf")
    assert not resolved.weights.exists() and store.blobs.digests() == []


def test_adapters(store: ModelStore, tiny_llama_gguf: Path, tmp_path: Path) -> None:
    gguf_lora = write_gguf_lora(tmp_path / "lora.gguf")
    peft = write_peft_lora(tmp_path / "peft")
    store.create("tuned", f"FROM {tiny_llama_gguf}\nADAPTER ./lora.gguf\nADAPTER {peft}\n",
                 base_dir=tmp_path)
    adapters = store.resolve("tuned").adapters
    assert [a.format for a in adapters] == ["gguf", "safetensors"]
    assert adapters[0].path.read_bytes() == gguf_lora.read_bytes()
    assert adapters[0].config is None
    assert adapters[1].config == {"lora_alpha": 8, "peft_type": "LORA", "r": 4,
                                  "target_modules": ["q_proj"]}
    # a child inherits the adapters and can add more
    store.create("tuned2", f"FROM tuned\nADAPTER {gguf_lora}\n")
    assert len(store.resolve("tuned2").adapters) == 2      # the same blob is not added twice


@pytest.mark.parametrize("adapter, fragment", [
    ("model", "not a LoRA adapter"),          # a full model GGUF
    ("junk", "neither a GGUF nor a safetensors"),
    ("plain.safetensors", "no lora_A/lora_B"),
    ("missing.gguf", "no such file"),
    ("dir", "not a PEFT adapter directory"),
])
def test_bad_adapters_point_at_the_line(store: ModelStore, tiny_llama_gguf: Path, tmp_path: Path,
                                        adapter: str, fragment: str) -> None:
    paths = {"model": tiny_llama_gguf, "junk": tmp_path / "junk.bin",
             "plain.safetensors": tmp_path / "plain.safetensors",
             "missing.gguf": tmp_path / "missing.gguf", "dir": tmp_path}
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 100)
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelfileError) as info:
        store.create("x", f"FROM {tiny_llama_gguf}\n\n  ADAPTER {paths[adapter]}\n")
    assert (info.value.line, info.value.column) == (3, 11)
    assert fragment in str(info.value)
    assert store.list() == [] and store.blobs.digests() == []     # the imported GGUF went too


@pytest.mark.parametrize("from_value, fragment", [
    ("./missing.gguf", "no such file or directory"),
    ("not-stored:v1", "no such model in the store"),
    ("bad name!", "neither an existing path nor a valid model name"),
    ("notes.txt", "not a GGUF file"),
    ("truncated.gguf", "truncated"),
    ("emptydir", "not a model directory"),
    ("@sha256:" + "0" * 64, "no such blob"),
])
def test_bad_from_points_at_the_line(store: ModelStore, tmp_path: Path, tiny_llama_gguf: Path,
                                     from_value: str, fragment: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    data = tiny_llama_gguf.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ModelfileError) as info:
        store.create("x", f"# header\nFROM {from_value}\n", base_dir=tmp_path)
    assert (info.value.line, info.value.column) == (2, 6)
    assert fragment in str(info.value)
    assert store.list() == [] and store.blobs.digests() == []


def test_from_a_blob_digest(store: ModelStore, tiny_llama_gguf: Path) -> None:
    info = store.blobs.import_file(tiny_llama_gguf)          # as /api/blobs would store it
    store.create("by-digest", f"FROM @{info.digest}\n")
    assert store.resolve("by-digest").weights == store.blobs.path(info.digest)


def test_resolve_errors(store: ModelStore, tiny_llama_gguf: Path) -> None:
    store.create("present", f"FROM {tiny_llama_gguf}\n", )
    with pytest.raises(UnknownModelError) as info:
        store.resolve("absent")
    assert info.value.name == "absent:latest" and info.value.available == ["present:latest"]
    weights = store.resolve("present").weights
    weights.unlink()
    weights.write_bytes(b"GGUF changed in place")
    with pytest.raises(CorruptModelError, match="the manifest says"):
        store.resolve("present")
    assert store.verify("present") == [f"sha256:{weights.name[7:]}"]
    weights.unlink()
    with pytest.raises(CorruptModelError, match="missing"):
        store.resolve("present")


# -- what a create may read from the server's disk (issue 13) ------------------------------------

SECRET = b"SHOAL_ADMIN_KEY=secret-that-must-never-be-stored-0123456789"


def model_dir_copy(source: Path, target: Path) -> Path:
    """A private copy of a model directory (regular files, one link each)."""
    target.mkdir(parents=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def blobs_hold(store: ModelStore, data: bytes) -> bool:
    return any(data in store.blobs.path(d).read_bytes() for d in store.blobs.digests())


def test_a_symlink_in_a_model_directory_never_reaches_the_store(store: ModelStore,
                                                                tiny_llama_dir: Path,
                                                                tmp_path: Path) -> None:
    """FROM <dir> where the dir holds `stolen.json -> secret`: the secret is not stored (not a
    file a model needs, and a symlink); a symlink under a name the model does need fails the
    create; the secret is in no blob either way."""
    secret = tmp_path / "secret.env"
    secret.write_bytes(SECRET)
    model = model_dir_copy(tiny_llama_dir, tmp_path / "model")
    (model / "stolen.json").symlink_to(secret)
    store.create("innocent", f"FROM {model}\n")
    assert not blobs_hold(store, SECRET)
    titles = {layer.title for layer in store.manifests.read(store._name("innocent"))[0].layers}
    assert "stolen.json" not in titles and "config.json" in titles

    (model / "special_tokens_map.json").symlink_to(secret)
    with pytest.raises(ModelfileError, match="special_tokens_map.json is a symbolic link"):
        store.create("thief", f"FROM {model}\n")
    assert not blobs_hold(store, SECRET) and not store.exists("thief")


def test_hard_links_fifos_and_pickles_in_a_model_directory(store: ModelStore,
                                                           tiny_llama_dir: Path,
                                                           tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_bytes(SECRET)
    model = model_dir_copy(tiny_llama_dir, tmp_path / "model")
    os.link(secret, model / "generation_config.json")        # a hard link to a file elsewhere
    with pytest.raises(ModelfileError, match="generation_config.json has other hard links"):
        store.create("x", f"FROM {model}\n")
    (model / "generation_config.json").unlink()
    os.mkfifo(model / "added_tokens.json")                   # would block a reader for ever
    with pytest.raises(ModelfileError, match="added_tokens.json is not a regular file"):
        store.create("x", f"FROM {model}\n")
    (model / "added_tokens.json").unlink()
    (model / "pytorch_model.bin").write_bytes(b"pickle")     # never kept
    (model / "notes.json").write_bytes(b"{}")                # not a file the model needs
    store.create("x", f"FROM {model}\n")
    titles = {layer.title for layer in store.manifests.read(store._name("x"))[0].layers}
    assert titles == {"config.json", "model.safetensors", "tokenizer.json",
                      "tokenizer_config.json"}
    assert not blobs_hold(store, SECRET)


def test_an_imported_file_edited_later_leaves_the_model_intact(store: ModelStore,
                                                               tiny_llama_gguf: Path,
                                                               tmp_path: Path) -> None:
    """The create copies the GGUF: its owner editing it in place afterwards changes nothing
    the store serves (a hard link would have changed the blob under every model using it)."""
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(tiny_llama_gguf.read_bytes())
    store.create("victim", f"FROM {mine}\n")
    weights = store.resolve("victim").weights
    with open(mine, "r+b") as f:
        f.seek(mine.stat().st_size // 2)
        f.write(b"\xff" * 64)
    assert store.verify("victim") == []
    assert weights.read_bytes() == tiny_llama_gguf.read_bytes()
    assert weights.stat().st_mode & 0o777 == 0o444 and weights.stat().st_nlink == 1
    store.delete("victim")                                    # read-only blobs still go
    assert store.blobs.digests() == []


def test_path_problems_read_the_same_to_callers_who_are_not_admins(store: ModelStore,
                                                                   tiny_llama_dir: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch) -> None:
    """With `detailed=False` a missing file, a file that is not a model, an empty directory, a
    directory with a symlink and `../..` all fail with one message that names neither the
    server's directories nor what is wrong; a name-like value is a model name, even when a
    folder of that name exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt.gguf").write_text("hello")
    (tmp_path / "emptydir").mkdir()
    linked = model_dir_copy(tiny_llama_dir, tmp_path / "linked")
    (linked / "vocab.json").symlink_to("/etc/hostname")
    paths = LocalPaths(detailed=False)
    messages = {}
    for value in ("./missing.gguf", "./notes.txt.gguf", "./emptydir", "./linked", "../..",
                  "/etc/hostname.gguf", "~/x.gguf"):
        with pytest.raises(ModelfileError) as info:
            store.create("x", f"FROM {value}\n", base_dir=tmp_path, paths=paths)
        messages[value] = str(info.value).replace(repr(value), "VALUE")
        assert str(tmp_path) not in str(info.value)
    assert len(set(messages.values())) == 1, messages
    assert GENERIC_PATH_PROBLEM in next(iter(messages.values()))
    with pytest.raises(ModelfileError, match="no such model in the store"):
        store.create("x", "FROM emptydir\n", base_dir=tmp_path, paths=paths)
    assert store.list() == [] and store.blobs.digests() == []
    # the same caller may still create from a real model path (allowed, just not detailed)
    model_dir_copy(tiny_llama_dir, tmp_path / "fine")
    store.create("fine", "FROM ./fine\n", base_dir=tmp_path, paths=paths)
    assert store.exists("fine")


def test_local_paths_refused(store: ModelStore, tiny_llama_gguf: Path, tmp_path: Path) -> None:
    """With local paths turned off nothing on the server's disk is read (not even probed);
    stored models and uploaded blobs still work."""
    paths = LocalPaths(refusal="local paths are off")
    info = store.blobs.import_file(tiny_llama_gguf)           # as /api/blobs stores an upload
    for text in (f"FROM {tiny_llama_gguf}\n", "FROM ./x.gguf\n",
                 f"FROM @{info.digest}\nADAPTER lora\n"):
        with pytest.raises(PermissionDeniedError, match="local paths are off"):
            store.create("x", text, base_dir=tmp_path, paths=paths)
    info = store.blobs.import_file(tiny_llama_gguf)           # (the failed create dropped it)
    store.create("by-blob", f"FROM @{info.digest}\n", paths=paths)
    store.create("by-upload", "FROM weights.gguf\n", paths=paths,
                 uploads={"weights.gguf": {"weights.gguf": info.digest}})
    store.create("by-name", "FROM by-blob\nSYSTEM hi\n", paths=paths)
    assert {m.name for m in store.list()} == {"by-blob:latest", "by-upload:latest",
                                              "by-name:latest"}


def test_create_from_uploaded_directory_files(store: ModelStore, tiny_llama_dir: Path,
                                              tiny_llama_gguf: Path, tmp_path: Path) -> None:
    """`uploads` (what `shoal create` and Ollama's `files` send): a model directory's files and
    a PEFT adapter's, as blobs by file name; names a model does not need are ignored."""
    files = {p.name: store.blobs.write_bytes(p.read_bytes()).digest
             for p in tiny_llama_dir.iterdir()}
    files["README.md"] = store.blobs.write_bytes(b"readme").digest
    peft = write_peft_lora(tmp_path / "peft").parent
    adapter = {p.name: store.blobs.write_bytes(p.read_bytes()).digest for p in peft.iterdir()}
    stored = store.create("uploaded", "FROM ./dir\nADAPTER ./peft\n",
                          paths=LocalPaths(refusal="no local paths"),
                          uploads={"./dir": files, "./peft": adapter})
    assert stored.details.format == "safetensors"
    resolved = store.resolve("uploaded")
    assert sorted(p.name for p in resolved.weights.iterdir()) == \
        sorted(n for n in files if n != "README.md")
    assert resolved.adapters[0].format == "safetensors"
    assert resolved.adapters[0].config["lora_alpha"] == 8
    with pytest.raises(ModelfileError, match="has not been uploaded"):
        store.create("x", "FROM ./dir\n", uploads={"./dir": {"config.json": "sha256:" + "1" * 64,
                                                             "model.safetensors": files["model.safetensors"]}})


def test_show_modelfile_of_a_directory_model_creates_again(store: ModelStore,
                                                           tiny_llama_dir: Path) -> None:
    """`show --modelfile` names the store's own folder of symlinks: that path is the store's
    blobs, not a directory of strangers' symlinks, so it creates the same model again."""
    store.create("hf", f"FROM {tiny_llama_dir}\n")
    shown = store.show("hf").modelfile
    assert str(store.root / "dirs") in shown
    store.create("again", shown, paths=LocalPaths(detailed=False))
    assert store.resolve("again").weights == store.resolve("hf").weights


def test_create_from_a_sentence_transformers_directory(store: ModelStore, minilm_dir: Path) -> None:
    """FROM a sentence-transformers directory keeps its Pooling module's config (flat, as the
    store has no folders) and modules.json, so the stored model pools as the original."""
    from shoal.model.encoder_config import encoder_config_from_hf
    from shoal.model.encoder_loader import is_encoder_model

    stored = store.create("minilm", f"FROM {minilm_dir}\n")
    assert stored.details.family == "bert" and stored.details.format == "safetensors"
    weights = Path(store.resolve("minilm").weights)
    assert (weights / "1_Pooling.config.json").is_file() and (weights / "modules.json").is_file()
    assert is_encoder_model(weights)
    config = encoder_config_from_hf(weights)
    assert (config.pooling, config.normalize, config.max_seq_length) == ("mean", True, 256)
    # the store's own folder as FROM again (what `show --modelfile` writes)
    again = store.create("minilm-again", f"FROM {weights}\n")
    assert again.details.family == "bert"
