"""shoal's torch dequantization vs the gguf package's numpy reference, bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from shoal.core.errors import CorruptModelError, UnsupportedModelError
from shoal.model.loaders.dequant import SUPPORTED_TYPES, dequantize
from shoal.model.loaders.gguf_loader import GGUFModelSource

T = GGMLQuantizationType
# byte offsets of the fp16 scale/min fields inside one block of each block-quantized type
_FP16_FIELDS = {
    T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2),
    T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def synthetic_bytes(qtype: GGMLQuantizationType, rows: int, blocks_per_row: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Random block bytes whose fp16 scales are finite (so NaN payloads never matter)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        return (rng.standard_normal((rows, blocks_per_row)) * 3).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        return (rng.standard_normal((rows, blocks_per_row)) * 3).astype(np.float16).view(np.uint8)
    raw = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS.get(qtype, ()):
        scales = (rng.standard_normal(rows * blocks_per_row) * 0.05).astype(np.float16)
        raw[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, blocks_per_row * type_size)


def test_every_required_type_is_supported() -> None:
    required = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K,
                T.Q6_K}
    assert required <= SUPPORTED_TYPES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES, key=lambda t: t.value),
                         ids=lambda t: t.name)
def test_matches_gguf_reference_bit_exactly(qtype: GGMLQuantizationType, device: str) -> None:
    rng = np.random.default_rng(qtype.value)
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 5, 3
    raw = synthetic_bytes(qtype, rows, blocks_per_row, rng)
    expected = np.asarray(quants.dequantize(raw, qtype), dtype=np.float32)
    got = dequantize(torch.from_numpy(raw.copy()).to(device), qtype,
                     (rows, blocks_per_row * block_size))
    assert got.dtype == torch.float32
    assert got.device.type == device
    assert got.shape == expected.shape
    assert np.array_equal(got.cpu().numpy().view(np.uint32), expected.view(np.uint32))
    assert np.isfinite(expected).all() or qtype == T.BF16
    # non-trivial data: a constant output would hide unpacking mistakes
    assert len(np.unique(expected)) > block_size // 2


def test_one_dimensional_and_three_dimensional_shapes() -> None:
    rng = np.random.default_rng(7)
    raw = synthetic_bytes(T.Q8_0, 6, 2, rng)
    flat = dequantize(torch.from_numpy(raw.reshape(-1).copy()), T.Q8_0, (6 * 64,))
    cube = dequantize(torch.from_numpy(raw.copy()), T.Q8_0, (2, 3, 64))
    assert torch.equal(flat.reshape(2, 3, 64), cube)


def test_unsupported_type_names_type_and_tensor() -> None:
    raw = torch.zeros(18 * 2, dtype=torch.uint8)  # two IQ4_NL-sized blocks
    with pytest.raises(UnsupportedModelError) as info:
        dequantize(raw, T.IQ4_NL, (64,), tensor_name="blk.0.ffn_up.weight", source="x.gguf")
    assert "IQ4_NL" in str(info.value) and "blk.0.ffn_up.weight" in str(info.value)
    with pytest.raises(UnsupportedModelError, match="type#250"):
        dequantize(raw, 250, (64,), tensor_name="w")


def test_wrong_byte_count_is_corrupt() -> None:
    raw = torch.zeros(33, dtype=torch.uint8)
    with pytest.raises(CorruptModelError, match="expected 34"):
        dequantize(raw, T.Q8_0, (32,), tensor_name="w")
    with pytest.raises(CorruptModelError, match="block size"):
        dequantize(torch.zeros(34, dtype=torch.uint8), T.Q8_0, (1, 40), tensor_name="w")


def test_real_model_tensors_match_reference(smollm2_path: Path) -> None:
    source = GGUFModelSource(smollm2_path)
    try:
        infos = source.header.tensors
        picks = ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight",
                 "blk.7.attn_norm.weight", "output_norm.weight"]
        kinds = {infos[name].type_name for name in picks}
        assert {"Q8_0", "Q4_1", "F32"} <= kinds
        raw_file = np.memmap(smollm2_path, dtype=np.uint8, mode="r")
        for name in picks:
            info = infos[name]
            block, size = GGML_QUANT_SIZES[T(info.ggml_type)]
            raw = np.array(raw_file[info.offset:info.offset + info.nbytes])
            raw = raw.reshape(*info.shape[:-1], info.shape[-1] // block * size)
            expected = np.asarray(quants.dequantize(raw, T(info.ggml_type)), dtype=np.float32)
            got = source._dequantize(info, None).numpy()
            assert got.shape == expected.shape == info.shape
            assert np.array_equal(got, expected), name
        del raw_file
    finally:
        source.close()
