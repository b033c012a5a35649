"""The BERT encoder against sentence-transformers on the same all-MiniLM-L6-v2 directory:
exact and fast embeddings of 220 varied sentences, and the ranking of a small retrieval set;
pooling read from the model's files; a llama.cpp-style bert GGUF of the same weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from embedding_texts import RETRIEVAL, sentences

from shoal.model.encoder import PackedBatch
from shoal.model.encoder_loader import is_encoder_model, load_encoder

sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = sentences(220)


def _shoal_embed(encoder, texts: list[str]) -> torch.Tensor:
    limit = encoder.config.max_seq_length
    ids = []
    for text in texts:
        tokens = encoder.tokenizer.encode(text)
        # what the server does with an over-long text: keep [CLS] ... and the final [SEP]
        ids.append(tokens if len(tokens) <= limit else tokens[:limit - 1] + tokens[-1:])
    return torch.cat([encoder.model(ids[i:i + 32]) for i in range(0, len(ids), 32)])


@pytest.fixture(scope="module")
def reference(minilm_dir: Path):
    model = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu")
    return model


@pytest.fixture(scope="module")
def reference_vectors(reference) -> torch.Tensor:
    return torch.tensor(reference.encode(TEXTS, batch_size=32))


@pytest.mark.parametrize("compute,bar", [("exact", 0.9999), ("fast", 0.995)])
def test_embeddings_match_sentence_transformers(minilm_dir: Path, reference, reference_vectors,
                                                compute: str, bar: float) -> None:
    encoder = load_encoder(minilm_dir, compute)
    assert encoder.config.pooling == "mean" and encoder.config.normalize
    assert encoder.config.max_seq_length == 256
    ours = _shoal_embed(encoder, TEXTS)
    assert ours.shape == reference_vectors.shape == (len(TEXTS), 384)
    cos = F.cosine_similarity(ours, reference_vectors)
    assert cos.min().item() >= bar, (compute, cos.min().item(), TEXTS[int(cos.argmin())][:60])
    # the retrieval ranking: each query's best document is the same one
    queries = [q for q, _ in RETRIEVAL]
    docs = [d for _, d in RETRIEVAL]
    ref_q = torch.tensor(reference.encode(queries))
    ref_d = torch.tensor(reference.encode(docs))
    our_q, our_d = _shoal_embed(encoder, queries), _shoal_embed(encoder, docs)
    ref_top = (ref_q @ ref_d.T).argmax(1)
    our_top = (our_q @ our_d.T).argmax(1)
    assert our_top.tolist() == ref_top.tolist()
    assert ref_top.tolist() == list(range(len(RETRIEVAL)))     # the set is unambiguous


def test_a_batch_gives_what_each_input_gives_alone(minilm_dir: Path) -> None:
    """Padding-free packing: an input's vector does not depend on its batch company."""
    encoder = load_encoder(minilm_dir, "exact")
    texts = ["short", "a much longer sentence with many more tokens than the first one", "mid size"]
    batched = encoder.model([encoder.tokenizer.encode(t) for t in texts])
    alone = torch.cat([encoder.model([encoder.tokenizer.encode(t)]) for t in texts])
    torch.testing.assert_close(batched, alone, atol=2e-6, rtol=0)


def test_pooling_comes_from_the_models_files(minilm_dir: Path, tmp_path: Path) -> None:
    """CLS pooling and no Normalize module, written in the directory: shoal follows it, as
    sentence-transformers does."""
    copy = tmp_path / "cls-model"
    shutil.copytree(minilm_dir, copy)
    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules = [m for m in json.loads((copy / "modules.json").read_text())
               if not m["type"].endswith("Normalize")]
    (copy / "modules.json").write_text(json.dumps(modules))
    encoder = load_encoder(copy, "exact")
    assert (encoder.config.pooling, encoder.config.normalize) == ("cls", False)
    ref = sentence_transformers.SentenceTransformer(str(copy), device="cpu")
    texts = TEXTS[20:40]
    expected = torch.tensor(ref.encode(texts))
    ours = _shoal_embed(encoder, texts)
    assert not torch.allclose(ours.norm(dim=1), torch.ones(len(texts)))   # not normalised
    torch.testing.assert_close(ours, expected, atol=2e-4, rtol=1e-4)


def _write_bert_gguf(directory: Path, path: Path) -> None:
    """The directory as llama.cpp's converter writes a BERT model (names, vocabulary, pooling)."""
    import gguf
    from safetensors.torch import load_file

    from shoal.model.loaders.gguf_bert import _BLOCK_NAMES, _TOP_NAMES

    config = json.loads((directory / "config.json").read_text())
    vocab = json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]

    def phantom(tok: str) -> str:
        if tok.startswith("[") and tok.endswith("]"):
            return tok
        return tok[2:] if tok.startswith("##") else "\u2581" + tok

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_context_length(256)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_tokenizer_model("bert")
    writer.add_token_list([phantom(t) for t in tokens])
    # llama.cpp's keys (its spelling: "seperator")
    writer.add_uint32("tokenizer.ggml.cls_token_id", vocab["[CLS]"])
    writer.add_uint32("tokenizer.ggml.seperator_token_id", vocab["[SEP]"])
    writer.add_uint32("tokenizer.ggml.unknown_token_id", vocab["[UNK]"])
    writer.add_uint32("tokenizer.ggml.padding_token_id", vocab["[PAD]"])
    hf_to_gguf = {v: k for k, v in _TOP_NAMES.items()}
    for name, tensor in load_file(str(directory / "model.safetensors")).items():
        if name in hf_to_gguf:
            target = hf_to_gguf[name]
        elif name.startswith("encoder.layer."):
            index, _, rest = name[len("encoder.layer."):].partition(".")
            module, _, kind = rest.rpartition(".")
            short = {v: k for k, v in _BLOCK_NAMES.items()}[module]
            target = f"blk.{index}.{short}.{kind}"
        else:
            continue
        # NOTE: matrices as F16, as the converter's default; vectors stay F32
        data = tensor.numpy().astype("float16" if tensor.dim() == 2 else "float32")
        writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_bert_gguf_loads_with_its_wordpiece_vocabulary(minilm_dir: Path, reference,
                                                         reference_vectors, tmp_path: Path) -> None:
    path = tmp_path / "all-minilm-f16.gguf"
    _write_bert_gguf(minilm_dir, path)
    assert is_encoder_model(path)
    encoder = load_encoder(path, "exact")
    assert encoder.format == "gguf" and encoder.config.pooling == "mean"
    texts = TEXTS[:60]
    for text in texts:           # the same WordPiece tokens as tokenizer.json gives
        assert encoder.tokenizer.encode(text) == reference.tokenizer(text)["input_ids"]
    cos = F.cosine_similarity(_shoal_embed(encoder, texts), reference_vectors[:60])
    assert cos.min().item() >= 0.9995      # F16 weights


@pytest.mark.parametrize("on_pool", [True, False])
def test_fast_mode_gives_an_input_the_same_bits_alone_or_in_any_batch(minilm_dir: Path,
                                                                      on_pool: bool) -> None:
    """Both fast passes: the work pool's (AMX products, the kernels' attention and norms) and
    torch's OpenMP one. Every step is per row or per input, so batching changes no bit."""
    encoder = load_encoder(minilm_dir, "fast")
    if on_pool and not encoder.model.on_pool:
        pytest.skip("no AMX here: fast mode runs torch's OpenMP pass")
    if not on_pool:
        _off_the_pool(encoder.model)
    texts = ["short", "a much longer sentence with many more tokens than the first one",
             "mid size", "another", "word " * 60]
    ids = [encoder.tokenizer.encode(t) for t in texts]
    alone = torch.cat([encoder.model([i]) for i in ids])
    assert torch.equal(encoder.model(ids), alone)
    assert torch.equal(encoder.model(ids[::-1] * 20)[-len(ids):].flip(0), alone)


def test_the_pool_pass_agrees_with_torchs_pass(minilm_dir: Path) -> None:
    """Same integers in the products; attention and LayerNorm differ in float rounding only."""
    pooled = load_encoder(minilm_dir, "fast")
    if not pooled.model.on_pool:
        pytest.skip("no AMX here: fast mode runs torch's OpenMP pass")
    plain = load_encoder(minilm_dir, "fast")
    _off_the_pool(plain.model)
    cos = F.cosine_similarity(_shoal_embed(pooled, TEXTS[:64]), _shoal_embed(plain, TEXTS[:64]))
    # NOTE: a last-bit difference before a quantizer can move a value to the next int8 step,
    # so the two fast passes differ by fast mode's own noise (a wrong kernel: far below)
    assert cos.min().item() > 0.999


def _off_the_pool(model) -> None:
    model.on_pool = False
    for module in model.modules():
        if hasattr(module, "tiles"):
            module.tiles = None
        if hasattr(module, "on_pool"):
            module.on_pool = False


def test_the_one_call_stack_gives_the_per_op_pool_pass_bits(minilm_dir: Path) -> None:
    """shoal_encoder_stack runs the per-op pool pass's kernels in its order: the same bits."""
    encoder = load_encoder(minilm_dir, "fast")
    model = encoder.model
    if model.stack is None:
        pytest.skip("no AMX here: fast mode runs torch's OpenMP pass")
    ordered = sorted((encoder.tokenizer.encode(t) for t in TEXTS[:48] if len(t) < 400), key=len)
    batch = PackedBatch([len(ids) for ids in ordered], model.device)
    stack, model.stack = model.stack, None
    per_op = model.hidden_states(ordered, batch)
    embedded = model.embed_norm(F.embedding(torch.tensor([t for ids in ordered for t in ids]),
                                            model.word) + model.position[batch.positions] + model.type0)
    assert torch.equal(stack.run(embedded.contiguous(), batch.same_length), per_op)


def test_the_one_call_pass_agrees_with_the_per_op_pass(minilm_dir: Path) -> None:
    """Embeddings, norm and pooling in C++ too: float rounding apart, the same vectors."""
    encoder = load_encoder(minilm_dir, "fast")
    if encoder.model.stack is None:
        pytest.skip("no AMX here: fast mode runs torch's OpenMP pass")
    one_call = _shoal_embed(encoder, TEXTS[:64])
    encoder.model.stack = None
    cos = F.cosine_similarity(one_call, _shoal_embed(encoder, TEXTS[:64]))
    assert cos.min().item() > 0.999      # fast mode's own noise (see the test above)
    with pytest.raises(ValueError, match="token ids must lie"):
        load_encoder(minilm_dir, "fast").model([[1, 2, 10 ** 6]])
