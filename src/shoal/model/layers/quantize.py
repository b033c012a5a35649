"""Fast mode: calibrate activation ranges once, then convert float linears to int8.

SmoothQuant's idea, applied at load time: run a fixed calibration text through the
float model, record each linear layer's largest input per channel, and choose a
per-channel factor s = amax_x^a / amax_w^(1-a) that balances activation and weight
ranges before both are quantized. On SmolLM2-135M this cuts the KL divergence from
exact mode about threefold against plain per-row int8 (docs/benchmarks.md).
The factors depend only on the model and this text, so results stay deterministic
and batch-invariant.
"""
from __future__ import annotations

import torch
from torch import nn

from shoal.model.full_sequence import forward_single_sequence
from shoal.model.layers.linear import ExactLinear, Int8Linear

SMOOTH_ALPHA = 0.5

# NOTE: written for shoal; a mix of prose, dialogue, lists and code, so each layer sees
# the channel ranges ordinary prompts produce.
CALIBRATION_TEXT = """\
The river town woke slowly. Fishermen checked their nets while the bakery on the corner
pushed warm loaves into the morning air, and a delivery van hummed past the closed bank.
"Do you know when the ferry leaves?" asked the traveller. "Every hour, on the hour,"
said the clerk, "unless the wind is up. Then nobody knows."

Steps to brew a good cup of tea:
1. Boil fresh water and warm the pot.
2. Add one spoon of leaves per person.
3. Steep for four minutes, then pour.

def moving_average(values, window):
    total = sum(values[:window])
    result = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        result.append(total / window)
    return result

Q: What is 17 multiplied by 23? A: 391. The capital of Japan is Tokyo, and Mount Fuji
rises to 3,776 metres. In 1969 two astronauts walked on the Moon while a third orbited
above. Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.
<|im_start|>user
Can you summarise why the sky looks blue?<|im_end|>
<|im_start|>assistant
Sunlight scatters off air molecules, and blue light scatters the most, so it reaches
our eyes from every direction of the sky.<|im_end|>
"""


@torch.inference_mode()
def calibrate_input_ranges(model: nn.Module, token_ids: list[int]) -> dict[nn.Module, torch.Tensor]:
    """Largest |input| per channel seen by each ExactLinear during one forward pass."""
    ranges: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
        previous = ranges.get(module)
        ranges[module] = amax if previous is None else torch.maximum(previous, amax)

    linears = [m for m in model.modules() if isinstance(m, ExactLinear)]
    hooks = [m.register_forward_pre_hook(record) for m in linears]
    try:
        hidden = forward_single_sequence(model, token_ids)
        head = getattr(model, "lm_head", None)
        if isinstance(head, ExactLinear):
            # NOTE: compute_logits feeds the final hidden states straight to lm_head; record
            # them rather than computing every position's logits (for a 262k vocabulary that
            # matmul cost more than the rest of the calibration pass).
            record(head, (hidden,))
        else:
            model.compute_logits(hidden)
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def smoothing_factors(input_amax: torch.Tensor, weight: torch.Tensor,
                      alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    weight_amax = weight.detach().abs().amax(0).float().clamp(min=1e-5)
    return (input_amax.clamp(min=1e-5) ** alpha / weight_amax ** (1 - alpha)).clamp(min=1e-4)


def quantize_model_int8(model: nn.Module, calibration_ids: list[int]) -> None:
    """Replaces every ExactLinear of the model with a calibrated Int8Linear, in place."""
    # A model with a short context sees only what fits in it.
    ranges = calibrate_input_ranges(model, calibration_ids[: model.config.max_position_embeddings])
    convert_linears_int8(model, ranges)
    if getattr(model, "tied", False):
        model.embed_weight = None  # the int8 head serves embedding lookups from now on


def convert_linears_int8(model: nn.Module, ranges: dict[nn.Module, torch.Tensor]) -> None:
    """Replaces each ExactLinear with a recorded input range by a smoothed Int8Linear."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ExactLinear) and child in ranges:
                smooth = smoothing_factors(ranges[child], child.weight)
                setattr(parent, name, Int8Linear(child.weight.detach(),
                                                 None if child.bias is None else child.bias.detach(),
                                                 smooth))
