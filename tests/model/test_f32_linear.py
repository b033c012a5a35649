"""Exact mode's float32 linear kernel: close to F.linear, and a row's result is the same bits
whatever else is in the batch (the property MKL's sgemm lacks: its order changes with M)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.linear import ExactLinear

ops = load_cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")


# K: a multiple of 16 and two with a ragged last chunk; N: whole tiles and a ragged last one.
@pytest.mark.parametrize(("n", "k"), [(1000, 576), (37, 100), (9, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear_and_each_row_is_batch_invariant(n, k, with_bias):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(70, k, generator=g)
    full = ops.f32_linear(x, w, bias)
    assert torch.allclose(full, F.linear(x, w, bias), atol=1e-4 * k ** 0.5, rtol=1e-5)
    # every batch size the tiles see (1 row, 4-row tiles, remainders, several row panels)
    for rows in (1, 2, 3, 4, 5, 9, 33, 70):
        for start in (0, 70 - rows):
            part = ops.f32_linear(x[start:start + rows], w, bias)
            assert torch.equal(part, full[start:start + rows]), (rows, start)


def test_an_exact_linear_with_the_kernel_keeps_its_shape_and_bfloat16_weights_never_use_it():
    g = torch.Generator().manual_seed(3)
    layer = ExactLinear(torch.randn(48, 32, generator=g))
    x = torch.randn(2, 5, 32, generator=g)
    expected = layer(x)
    layer.enable_f32_kernel(ops)
    assert layer.kernels is ops
    got = layer(x)
    assert got.shape == (2, 5, 48) and torch.allclose(got, expected, atol=1e-5)
    half = ExactLinear(torch.randn(48, 32, generator=g).to(torch.bfloat16))
    half.enable_f32_kernel(ops)
    assert half.kernels is None                        # bfloat16 weights never reach the kernel
