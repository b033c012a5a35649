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


@pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")
def test_the_fused_gelu_path_quantizes_what_torch_gelu_gives():
    """dequant_gelu_hadamard_quant computes GELU (erf) itself: its int8 rows may differ from
    PyTorch's GELU followed by the rotation only where a value sits on a rounding boundary."""
    g = torch.Generator().manual_seed(3)
    t, k = 256, 1536
    acc = torch.randint(-30000, 30000, (t, k), dtype=torch.int32, generator=g)
    x_scale, w_scale = torch.rand(t, 1, generator=g) * 2e-4, torch.rand(k, generator=g)
    bias = torch.randn(k, generator=g)
    q, s = ops.dequant_gelu_hadamard_quant(acc, x_scale, w_scale, bias)
    q_ref, s_ref = ops.hadamard_quant_rows(F.gelu(ops.dequant_rows(acc, x_scale, w_scale, bias)))
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    off = (q.int() - q_ref.int()).abs()
    assert off.max().item() <= 1 and off.float().mean().item() < 1e-4
