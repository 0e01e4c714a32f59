"""Train a tiny GPT on text generated here (nothing downloaded) and watch its gradient norms.

    python examples/train_tiny_gpt.py --clip fusedclip --steps 200 --device cuda --plot norms.png

--clip torch      torch.nn.utils.clip_grad_norm_ then optimizer.step()
--clip fusedclip  fusedclip.clip_grad_norm_ then optimizer.step()
--clip fused-step fusedclip.clip_and_step (the clip folded into the fused AdamW step)

Each logged step prints the loss and the total gradient norm; per-layer norms come from
fusedclip.multi_tensor_norm(..., per_tensor=True) in the same pass. With matplotlib installed a PNG of the norms
over steps is written to --plot.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedclip


def make_text(n_chars: int, seed: int = 0) -> str:
    """Sentences from a small grammar: enough structure for a tiny model to learn in a few hundred steps."""
    gen = torch.Generator().manual_seed(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "every bird", "the small child"]
    verbs = ["sees", "likes", "follows", "draws", "finds", "remembers"]
    objects = ["the moon", "a red ball", "the river", "seven stones", "the quiet house", "a green leaf"]
    tails = [".", " today.", " again.", " at night.", " by the sea."]
    parts = []
    size = 0
    while size < n_chars:
        pick = [int(torch.randint(len(x), (1,), generator=gen)) for x in (subjects, verbs, objects, tails)]
        s = f"{subjects[pick[0]]} {verbs[pick[1]]} {objects[pick[2]]}{tails[pick[3]]} "
        parts.append(s)
        size += len(s)
    return "".join(parts)[:n_chars]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), diagonal=1)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def train(
    clip: str = "fusedclip",
    steps: int = 100,
    device: str = "cpu",
    seed: int = 0,
    max_norm: float = 0.5,
    batch: int = 16,
    context: int = 64,
    log_every: int = 10,
    plot: Optional[str] = None,
    quiet: bool = False,
) -> dict:
    """Run the training loop; returns the per-step records (loss, total norm, per-layer norms, step time)."""
    if clip not in ("torch", "fusedclip", "fused-step"):
        raise ValueError(f"clip must be torch, fusedclip or fused-step, got {clip!r}")
    torch.manual_seed(seed)
    text = make_text(40_000, seed)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    model = TinyGPT(len(chars), context=context).to(device)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    # fused=True on both devices so the three modes run the same optimizer arithmetic.
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(seed + 1)
    records = []
    for step in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + context] for s in starts]).to(device)
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts]).to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Per-layer norms before the clip, for the log (one fused reduction; not part of the timed clip work).
        _, per_layer = fusedclip.multi_tensor_norm([p.grad for p in params], per_tensor=True)
        if clip == "torch":
            total = torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
        elif clip == "fusedclip":
            total = fusedclip.clip_grad_norm_(params, max_norm)
            opt.step()
        else:
            total = fusedclip.clip_and_step(opt, max_norm)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss.item(), "total_norm": float(total), "time_s": dt,
               "per_layer": per_layer.tolist()}
        records.append(rec)
        if not quiet and (step % log_every == 0 or step == steps - 1):
            top = sorted(zip(rec["per_layer"], names), reverse=True)[:2]
            print(f"step {step:4d}  loss {rec['loss']:.4f}  grad norm {rec['total_norm']:.4f}  "
                  f"largest: {', '.join(f'{n} {v:.3f}' for v, n in top)}")
    result = {"clip": clip, "device": device, "names": names, "records": records}
    if plot:
        write_plot(result, plot, max_norm, quiet)
    return result


def write_plot(result: dict, path: str, max_norm: float, quiet: bool = False) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot ({path})")
        return False
    recs = result["records"]
    steps = [r["step"] for r in recs]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    a1.plot(steps, [r["total_norm"] for r in recs], label="total grad norm")
    a1.axhline(max_norm, color="gray", linestyle="--", label="max_norm")
    a1.set_yscale("log")
    a1.legend()
    per_layer = list(zip(*[r["per_layer"] for r in recs]))
    for name, values in zip(result["names"], per_layer):
        a2.plot(steps, values, linewidth=0.8, label=name if "blocks.0" in name or "blocks" not in name else None)
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("per-layer grad norm")
    a2.legend(fontsize=6, ncol=2)
    fig.suptitle(f"tiny GPT, clip={result['clip']}, device={result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", choices=["torch", "fusedclip", "fused-step"], default="fusedclip")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-norm", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default="tiny_gpt_norms.png", help="PNG path ('' for none)")
    ap.add_argument("--json", default="", help="write the per-step records here")
    args = ap.parse_args()
    result = train(args.clip, args.steps, args.device, args.seed, args.max_norm, plot=args.plot or None)
    times = sorted(r["time_s"] for r in result["records"][5:]) or [math.nan]
    print(f"median step time {1e3 * times[len(times) // 2]:.2f} ms ({args.clip}, {args.device})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
