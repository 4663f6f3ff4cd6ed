"""Does the recurrent memory help? A copy task whose answer lies two segments back.

The stream is cut into segments of L tokens (one segment per training call, memory carried
across calls, rows kept contiguous by `StreamBatches`). Every third segment is a copy: it starts
with the COPY marker and repeats the L - 1 content tokens of the segment two before it (which
starts with NEW); the other segments are random. Predicting a copy token needs the token 2L
positions back, outside the current segment, so only a memory can help: with memory the loss on
copy tokens should fall towards 0, without it it stays near log(content) nats.

Compared (same data, steps and seed): transformer_xl with mem_len 2L; transformer_xl with
mem_len 0 (segments alone, "without memory"); the first model evaluated with its memory reset at
every segment; and compressive_transformer with mem_len L plus a compressed memory (the block is
only in the compressed memory). Evaluation reads a held-out stream of many segments, longer than
any training call. Run: `python benchmarks/memory_helps.py [--steps 300] [--models xl,none]`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import efficient_transformers as et
from efficient_transformers.models.memory import StreamBatches, stream_loss

NEW, COPY = 0, 1


def make_stream(units: int, L: int, content: int, generator: torch.Generator):
    """(tokens (units * 3L,), copy_target (units * 3L,) bool): one unit = block, noise, copy."""
    def block(marker):
        body = torch.randint(2, 2 + content, (L - 1,), generator=generator)
        return torch.cat([torch.tensor([marker]), body])
    pieces, targets = [], []
    for _ in range(units):
        first, noise = block(NEW), block(NEW)
        copy = torch.cat([torch.tensor([COPY]), first[1:]])
        pieces += [first, noise, copy]
        targets += [torch.zeros(2 * L, dtype=torch.bool), torch.arange(L) >= 1]
    return torch.cat(pieces), torch.cat(targets)


def build(name: str, L: int, content: int, dim: int, **options):
    return et.build_model(name, task="lm", vocab_size=2 + content, dim=dim, depth=2, heads=4,
                          max_len=16 * L, segment_len=L, **options)


def train(model, steps: int, L: int, content: int, batch: int, lr: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    step = 0
    while step < steps:
        stream, _ = make_stream(batch * 8, L, content, gen)  # 8 units (24 segments) per row
        memory = None
        for tokens in StreamBatches(stream, batch, L):
            out = model(tokens, labels=tokens, memory=memory)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            memory = out.memory
            step += 1
            if step == steps:
                break
    return model


def evaluate(model, L: int, content: int, rows: int, units: int, seed: int, reset: bool = False):
    gen = torch.Generator().manual_seed(seed)
    data = [make_stream(units, L, content, gen) for _ in range(rows)]
    stream = torch.stack([d[0] for d in data])
    copy = torch.stack([d[1] for d in data])
    chunk = L if reset else 4 * L  # reading 4 segments per call: longer than any training call
    copy_loss, _ = stream_loss(model, stream, chunk, reset_memory=reset, positions=copy)
    all_loss, _ = stream_loss(model, stream, chunk, reset_memory=reset)
    return copy_loss, all_loss


def run(steps: int = 300, L: int = 16, content: int = 16, dim: int = 64, batch: int = 16,
        lr: float = 3e-3, seed: int = 0, eval_units: int = 10,
        models: tuple[str, ...] = ("xl", "none", "compressive")):
    """Returns {label: (copy-token loss, all-token loss)} on a held-out stream."""
    torch.manual_seed(seed)
    all_configs = {
        "xl": ("transformer_xl mem_len=2L", "transformer_xl", dict(mem_len=2 * L)),
        "none": ("transformer_xl mem_len=0 (no memory)", "transformer_xl", dict(mem_len=0)),
        "compressive": ("compressive mem_len=L cmem_len=L/2 rate 2", "compressive_transformer",
                        dict(mem_len=L, cmem_len=L // 2, compression_rate=2))}
    configs = {all_configs[m][0]: all_configs[m][1:] for m in models}
    results = {}
    for label, (name, options) in configs.items():
        torch.manual_seed(seed)
        model = train(build(name, L, content, dim, **options), steps, L, content, batch, lr, seed)
        results[label] = evaluate(model, L, content, 8, eval_units, seed + 1)
        if label.startswith("transformer_xl mem_len=2L"):
            results["  same model, memory reset every segment"] = evaluate(
                model, L, content, 8, eval_units, seed + 1, reset=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="xl,none,compressive",
                        help="comma-separated subset of xl, none, compressive")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids "
                        "oversubscription on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    steps = args.steps
    results = run(steps=steps, seed=args.seed, models=tuple(args.models.split(",")))
    print(f"copy task, segment 16, content 16 symbols (chance: ln 16 = {math.log(16):.3f} nats), "
          f"{steps} steps, {time.time() - t0:.0f} s")
    print(f"{'model':45s} {'copy-token loss':>16s} {'all-token loss':>15s}")
    for label, (copy_loss, all_loss) in results.items():
        print(f"{label:45s} {copy_loss:16.3f} {all_loss:15.3f}")


if __name__ == "__main__":
    main()
