"""A BERT-family encoder for sentence embeddings: many variable-length inputs in one pass.

The batch is flat: every linear layer, LayerNorm and GELU runs over the concatenated tokens
of all inputs [T, hidden], so no padding is ever multiplied. Only attention sees the inputs
apart: the inputs are ordered by length, so those of one length form one [n, L] block of
rows (one bidirectional SDPA each, no mask, no padding). So an input's arithmetic is the same
alone or in any batch: a padded view changed sums by ~1e-6, which fast mode's int8 rounding
turned into 3e-3 differences between an input alone and batched. Pooling (mean, CLS, last,
max) and the final L2 normalisation are the model's own (EncoderConfig). No KV cache: an
encoder reads each input once.

Compute modes as the decoder's: `exact` keeps float32 weights; `fast` converts every linear
to int8 x int8 (layers.linear.Int8Linear) after a SmoothQuant calibration pass at load, the
feed-forward output projection behind a Hadamard rotation (layers.hadamard).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shoal.core.errors import CorruptModelError
from shoal.model.encoder_config import EncoderConfig
from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.encoder_stack import EncoderStack
from shoal.model.layers.hadamard import ORDER as HADAMARD_ORDER
from shoal.model.layers.hadamard import HadamardInt8Linear
from shoal.model.layers.linear import (
    ExactLinear,
    Int8Linear,
    int8_products,
    make_linear,
    pack_tiles,
)
from shoal.model.layers.quantize import convert_linears_int8

# HF names inside "encoder.layer.N." and the ones of the embeddings
_LAYER_TENSORS = (
    "attention.self.query.weight", "attention.self.query.bias",
    "attention.self.key.weight", "attention.self.key.bias",
    "attention.self.value.weight", "attention.self.value.bias",
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "intermediate.dense.weight", "intermediate.dense.bias",
    "output.dense.weight", "output.dense.bias",
    "output.LayerNorm.weight", "output.LayerNorm.bias")
_EMBEDDING_TENSORS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                      "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                      "embeddings.LayerNorm.bias")


def _layer_norm(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> nn.LayerNorm:
    norm = nn.LayerNorm(weight.shape[0], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight.float())
        norm.bias.copy_(bias.float())
    norm.requires_grad_(False)
    return norm


class EncoderLayer(nn.Module):
    """Self-attention and the feed-forward block, each followed by residual + LayerNorm."""

    def __init__(self, config: EncoderConfig, w: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        qkv = torch.cat([w["attention.self.query.weight"], w["attention.self.key.weight"],
                         w["attention.self.value.weight"]])
        qkv_bias = torch.cat([w["attention.self.query.bias"], w["attention.self.key.bias"],
                              w["attention.self.value.bias"]])
        self.qkv = make_linear(qkv, qkv_bias, torch.float32)
        self.out = make_linear(w["attention.output.dense.weight"], w["attention.output.dense.bias"],
                               torch.float32)
        self.attn_norm = _layer_norm(w["attention.output.LayerNorm.weight"],
                                     w["attention.output.LayerNorm.bias"], config.layer_norm_eps)
        self.up = make_linear(w["intermediate.dense.weight"], w["intermediate.dense.bias"],
                              torch.float32)
        self.down = make_linear(w["output.dense.weight"], w["output.dense.bias"], torch.float32)
        self.mlp_norm = _layer_norm(w["output.LayerNorm.weight"], w["output.LayerNorm.bias"],
                                    config.layer_norm_eps)
        # fast mode on AMX: attention and norms from the kernels too. NOTE: this per-op pass
        # is the twin of the one-call one (EncoderStack), which tests hold to it bit for bit.
        self.on_pool = False

    def forward(self, x: torch.Tensor, batch: PackedBatch, ops=None) -> torch.Tensor:
        qkv = _apply(self.qkv, x, ops)                                 # [T, 3H]
        if self.on_pool:
            attn = ops.encoder_attention(qkv, batch.same_length, self.num_heads, self.head_dim,
                                         self.head_dim ** -0.5)
            # x is this pass's own tensor: the norms write over it
            x = ops.add_layer_norm(x, _apply(self.out, attn, ops), self.attn_norm.weight,
                                   self.attn_norm.bias, self.attn_norm.eps)
            return ops.add_layer_norm(x, self._feed_forward(x, ops), self.mlp_norm.weight,
                                      self.mlp_norm.bias, self.mlp_norm.eps)
        attn = torch.empty_like(x)
        for first, n, length in batch.same_length:   # inputs of one length sit side by side
            rows = slice(first, first + n * length)
            heads = qkv[rows].view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(heads[0], heads[1], heads[2])  # [n, h, L, d]
            attn[rows] = out.transpose(1, 2).reshape(n * length, x.shape[1])
        x = self.attn_norm(x + _apply(self.out, attn, ops))
        return self.mlp_norm(x + self._feed_forward(x, ops))

    def _feed_forward(self, x: torch.Tensor, ops) -> torch.Tensor:
        if ops is None or not (isinstance(self.up, Int8Linear)
                               and isinstance(self.down, HadamardInt8Linear)):
            return _apply(self.down, F.gelu(_apply(self.up, x, ops)), ops)
        # fast mode: the up projection's int32 sums go through GELU, the rotation and the
        # quantizer in one C++ pass (GELU alone was a sixth of the encoder's time)
        acc, xs = _int8_sums(self.up, x, ops)
        return self.down.forward_quantized(*ops.dequant_gelu_hadamard_quant(
            acc, xs, self.up.scale, _bias_or_none(self.up)))


def _apply(linear: nn.Module, x: torch.Tensor, ops) -> torch.Tensor:
    """The linear layer; an int8 one through the C++ quantize and dequantize ops when the
    kernels are there (one pass each instead of ~8 elementwise torch ops, which cost more
    than the int8 matmul itself at MiniLM's width). The same arithmetic per row."""
    if ops is None or not isinstance(linear, Int8Linear):
        return linear(x)
    return ops.dequant_rows(*_int8_sums(linear, x, ops), linear.scale, _bias_or_none(linear))


def _int8_sums(linear: Int8Linear, x: torch.Tensor, ops) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantized per row (after the layer's smoothing) times its int8 weight: the int32
    sums [T, N] and the rows' scales."""
    xq, xs = ops.quant_rows(x, linear.inv_smooth if linear.inv_smooth is not None else linear.ones)
    return int8_products(xq, linear, ops), xs


def _bias_or_none(linear: Int8Linear) -> torch.Tensor:
    """The bias, or an empty tensor the kernels read as none."""
    return linear.bias if linear.bias is not None else linear.ones[:0]


def equal_length_runs(lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first flat row, inputs, length) of each run of equal lengths, for inputs ordered by
    length and packed back to back."""
    runs: list[tuple[int, int, int]] = []
    first = 0
    for n in lengths:
        if runs and runs[-1][2] == n:
            start, count, _ = runs[-1]
            runs[-1] = (start, count + 1, n)
        else:
            runs.append((first, 1, n))
        first += n
    return runs


class PackedBatch:
    """Where each input's tokens sit in the flat batch: runs of inputs of one length for
    attention (the caller orders inputs by length, so each length is one run), and a padded
    view for max pooling."""

    def __init__(self, lengths: Sequence[int], device: torch.device) -> None:
        self.lengths = list(lengths)
        self.max_len = max(self.lengths)
        lens = torch.tensor(self.lengths, device=device)
        self.starts = torch.cumsum(lens, 0) - lens
        self.total = int(lens.sum())
        cols = torch.arange(self.max_len, device=device)
        valid = cols[None, :] < lens[:, None]                          # [B, L]
        # padded slot -> flat row; padding points at an extra zero row past the end
        self.gather_index = torch.where(valid, self.starts[:, None] + cols[None, :],
                                        torch.full_like(valid, self.total, dtype=torch.long))
        self.valid = valid
        self.positions = torch.cat([torch.arange(n, device=device) for n in self.lengths])
        self.same_length = equal_length_runs(self.lengths)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        extended = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        return extended[self.gather_index]


class SentenceEncoder(nn.Module):
    """Embeddings (word + position + token type, LayerNorm), the encoder layers, pooling."""

    def __init__(self, config: EncoderConfig, weights: Iterable[tuple[str, torch.Tensor]],
                 source: str = "model") -> None:
        super().__init__()
        self.config = config
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            if name.startswith(("embeddings.", "encoder.layer.")):
                if name.endswith("position_ids"):
                    continue       # a buffer some checkpoints store
                tensors[name] = tensor.float()
        missing = [n for n in _EMBEDDING_TENSORS if n not in tensors]
        for i in range(config.num_layers):
            missing += [f"encoder.layer.{i}.{n}" for n in _LAYER_TENSORS
                        if f"encoder.layer.{i}.{n}" not in tensors]
        if missing:
            raise CorruptModelError(source, f"missing tensor {missing[0]}")
        self.word = nn.Parameter(tensors.pop("embeddings.word_embeddings.weight"), requires_grad=False)
        self.position = nn.Parameter(tensors.pop("embeddings.position_embeddings.weight"),
                                     requires_grad=False)
        # NOTE: every input is one segment (type 0), as sentence-transformers encodes.
        self.type0 = nn.Parameter(tensors.pop("embeddings.token_type_embeddings.weight")[0].clone(),
                                  requires_grad=False)
        self.embed_norm = _layer_norm(tensors.pop("embeddings.LayerNorm.weight"),
                                      tensors.pop("embeddings.LayerNorm.bias"), config.layer_norm_eps)
        layers = []
        for i in range(config.num_layers):
            prefix = f"encoder.layer.{i}."
            layers.append(EncoderLayer(config, {n: tensors.pop(prefix + n) for n in _LAYER_TENSORS}))
        self.layers = nn.ModuleList(layers)
        self.kernels = None     # the C++ int8 ops, once fast mode converted the linears
        self.on_pool = False    # fast mode's pass on the kernels' work pool (quantize_int8)
        self.stack: EncoderStack | None = None   # that pass in one kernel call
        if self.word.shape != (config.vocab_size, config.hidden_size):
            raise CorruptModelError(source, f"word embeddings of shape {tuple(self.word.shape)}, "
                                            f"expected {(config.vocab_size, config.hidden_size)}")

    @property
    def device(self) -> torch.device:
        return self.word.device

    @torch.inference_mode()
    def forward(self, inputs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token ids of each input (special tokens included) -> pooled embeddings [B, hidden],
        L2-normalised when the model says so."""
        if self.kernels is None or self.stack is not None:
            # NOTE: the stack's pass is one kernel call (no torch op needs a team)
            return self._forward(inputs)
        if self.on_pool:
            # NOTE: the products and attention run on the work pool, where a thread the OS
            # lends to the event loop for a moment delays no one (csrc/encoder_ops.cpp);
            # torch's remaining ops (LayerNorm, adds, pooling) are small and stay on this thread.
            with self.kernels.torch_alone_in_this_thread():
                return self._forward(inputs)
        # NOTE: the pass alternates torch's OpenMP ops with the kernels' at every layer: the
        # kernels run as OpenMP regions during it too (kernels/csrc/pool.h says why)
        self.kernels.openmp_in_this_thread(True)
        try:
            return self._forward(inputs)
        finally:
            self.kernels.openmp_in_this_thread(False)

    def _forward(self, inputs: Sequence[Sequence[int]]) -> torch.Tensor:
        # NOTE: ordered by length, each length's inputs are one contiguous run of rows, so
        # attention takes them as a view (a gather and a scatter per length cost ~8%).
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        ordered = [inputs[i] for i in order]
        if self.stack is not None:
            pooled = self.stack.run_pass(ordered, equal_length_runs([len(s) for s in ordered]))
        else:
            batch = PackedBatch([len(s) for s in ordered], self.device)
            pooled = self.pool(self.hidden_states(ordered, batch), batch)
        if order == list(range(len(inputs))):
            return pooled
        where = [0] * len(order)          # input i -> its row among the ordered ones
        for row, i in enumerate(order):
            where[i] = row
        return pooled[where]

    def hidden_states(self, inputs: Sequence[Sequence[int]], batch: PackedBatch) -> torch.Tensor:
        device = self.device
        ids = torch.tensor([t for seq in inputs for t in seq], dtype=torch.long, device=device)
        x = self.embed_norm(F.embedding(ids, self.word) + self.position[batch.positions] + self.type0)
        for layer in self.layers:
            x = layer(x, batch, self.kernels)
        return x

    def pool(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        mode = self.config.pooling
        if mode == "cls":
            pooled = hidden[batch.starts]
        elif mode == "last":
            pooled = hidden[batch.starts + torch.tensor(batch.lengths, device=hidden.device) - 1]
        elif mode == "mean":
            sums = torch.zeros(len(batch.lengths), hidden.shape[1], device=hidden.device)
            owner = torch.repeat_interleave(torch.arange(len(batch.lengths), device=hidden.device),
                                            torch.tensor(batch.lengths, device=hidden.device))
            sums.index_add_(0, owner, hidden)
            pooled = sums / torch.tensor(batch.lengths, device=hidden.device,
                                         dtype=hidden.dtype)[:, None]
        else:    # max
            pooled = batch.pad(hidden).masked_fill(~batch.valid[:, :, None], -torch.inf).amax(1)
        if self.config.normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled

    def quantize_int8(self, calibration: Sequence[Sequence[int]]) -> None:
        """Fast mode: record each linear's input range on `calibration`, then convert them all
        to calibrated int8 (layers.quantize)."""
        ranges: dict[nn.Module, torch.Tensor] = {}

        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            previous = ranges.get(module)
            ranges[module] = amax if previous is None else torch.maximum(previous, amax)

        hooks = [m.register_forward_pre_hook(record) for m in self.modules()
                 if isinstance(m, ExactLinear)]
        try:
            self(calibration)
        finally:
            for hook in hooks:
                hook.remove()
        # NOTE: the feed-forward output projection's input (GELU over the intermediate
        # channels) has outliers that move from token to token: per-row int8, smoothed or not,
        # fell to a worst cosine of 0.992 against sentence-transformers (all-MiniLM-L6-v2, 520
        # sentences). Behind a Hadamard rotation it is 0.997, as with it left in float32.
        for layer in self.layers:
            ranges.pop(layer.down, None)
        convert_linears_int8(self, ranges)
        self.kernels = load_cpu_kernels() if self.device.type == "cpu" else None
        for layer in self.layers:
            if layer.down.weight.shape[1] % HADAMARD_ORDER == 0:   # else it stays float32
                layer.down = HadamardInt8Linear(layer.down.weight.detach(), layer.down.bias)
                layer.down.kernels = self.kernels
        for linear in self.modules():
            if isinstance(linear, Int8Linear):
                linear.ones = torch.ones(linear.qweight.shape[1])
        # NOTE: all or nothing: one layer left on torch's OpenMP product would run on this
        # thread alone in a pool pass.
        int8 = [m for m in self.modules() if isinstance(m, (Int8Linear, HadamardInt8Linear))]
        if len(int8) == 4 * len(self.layers) and all(pack_tiles(m, self.kernels) for m in int8):
            self.on_pool = True
            for layer in self.layers:
                layer.on_pool = True
            self.stack = EncoderStack(
                self.layers, self.kernels,
                {"word": self.word, "position": self.position, "type0": self.type0,
                 "norm_weight": self.embed_norm.weight, "norm_bias": self.embed_norm.bias},
                self.config.pooling, self.config.normalize)
        else:
            for m in int8:
                m.tiles = None
