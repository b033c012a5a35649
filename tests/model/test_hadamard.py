"""The Hadamard-rotated int8 linear (fast mode's encoder feed-forward output projection)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.hadamard import (
    HadamardInt8Linear,
    hadamard_chunks_torch,
    quantize_rows_torch,
)
from shoal.model.layers.linear import Int8Linear

ops = load_cpu_kernels()


def _rows_with_outliers(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """GELU-like rows where a different channel of each row dwarfs the rest."""
    g = torch.Generator().manual_seed(seed)
    x = F.gelu(torch.randn(t, k, generator=g))
    x[torch.arange(t), torch.randint(0, k, (t,), generator=g)] = 40.0
    return x


def test_the_rotation_is_orthogonal_up_to_its_order():
    x = torch.randn(5, 96, dtype=torch.float64)
    twice = hadamard_chunks_torch(hadamard_chunks_torch(x).double())
    torch.testing.assert_close(twice.double(), 32 * x.float().double(), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")
@pytest.mark.parametrize("t,k", [(1, 32), (7, 96), (130, 1536)])
def test_the_kernel_gives_the_pytorch_twins_bits(t: int, k: int):
    x = _rows_with_outliers(t, k)
    q, s = ops.hadamard_quant_rows(x)
    q_ref, s_ref = quantize_rows_torch(hadamard_chunks_torch(x))
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_rotation_holds_outliers_that_per_row_int8_flattens():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(384, 1536, generator=g) * 0.02, torch.randn(384, generator=g)
    x = _rows_with_outliers(64, 1536)
    exact = F.linear(x, weight, bias)
    rotated = HadamardInt8Linear(weight, bias)(x)
    per_row = Int8Linear(weight, bias)(x)

    def error(y: torch.Tensor) -> float:
        return ((y - exact).norm() / exact.norm()).item()

    assert error(rotated) < 0.5 * error(per_row), (error(rotated), error(per_row))
    assert error(rotated) < 0.02


@pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")
def test_kernel_and_pytorch_paths_agree_and_rows_do_not_depend_on_the_batch():
    weight, bias = torch.randn(48, 256) * 0.05, torch.randn(48)
    layer = HadamardInt8Linear(weight, bias)
    x = _rows_with_outliers(9, 256, seed=2)
    plain = layer(x)
    layer.kernels = ops
    fused = layer(x)
    assert torch.equal(plain, fused)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(alone, fused)


def test_a_width_the_rotation_cannot_split_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        HadamardInt8Linear(torch.randn(4, 48))
