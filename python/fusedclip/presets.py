"""Gradient shapes of real architectures, built from their configs (nothing is downloaded)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    @property
    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def _gpt2(n_layer: int, d: int, vocab: int, n_pos: int) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = [(vocab, d), (n_pos, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,)]  # ln_1, attn c_attn, attn c_proj
        shapes += [(d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp c_fc, mlp c_proj
    return shapes + [(d,), (d,)]  # ln_f; lm_head is tied to wte


def _llama(
    n_layer: int, d: int, ffn: int, vocab: int, n_kv_heads: int, head_dim: int, tied: bool
) -> list[tuple[int, ...]]:
    kv = n_kv_heads * head_dim
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(n_layer):
        shapes += [(d, d), (kv, d), (kv, d), (d, d)]  # q, k, v, o
        shapes += [(ffn, d), (ffn, d), (d, ffn)]  # gate, up, down
        shapes += [(d,), (d,)]  # input and post-attention RMSNorm
    shapes.append((d,))  # final norm
    if not tied:
        shapes.append((vocab, d))
    return shapes


def _many_small(blocks: int) -> list[tuple[int, ...]]:
    # A deep, narrow residual MLP: many tensors, each small, so launch and host overhead dominate.
    shapes: list[tuple[int, ...]] = []
    for _ in range(blocks):
        shapes += [(384, 128), (384,), (128,), (128,)]
    return shapes


PRESETS = {
    p.name: p
    for p in [
        Preset("gpt2", "GPT-2 small (12 layers, d=768, vocab 50257)", tuple(_gpt2(12, 768, 50257, 1024))),
        Preset(
            "llama-1b",
            "Llama-3.2-1B-style (16 layers, d=2048, ffn 8192, GQA 8 kv heads, vocab 128256, tied)",
            tuple(_llama(16, 2048, 8192, 128256, 8, 64, tied=True)),
        ),
        Preset(
            "llama-7b",
            "Llama-2-7B-style (32 layers, d=4096, ffn 11008, vocab 32000)",
            tuple(_llama(32, 4096, 11008, 32000, 32, 128, tied=False)),
        ),
        Preset("many-small", "deep narrow MLP: 2048 small tensors", tuple(_many_small(512))),
        Preset("huge", "one tensor of 2^29 + 7 elements", ((2**29 + 7,),)),
        Preset(
            "tiny",
            "GPT-2 layout at toy size (2 layers, d=64, vocab 1000): a smoke test",
            tuple(_gpt2(2, 64, 1000, 128)),
        ),
    ]
}
