"""Time one attention layer of the fixed-pattern mechanisms against `transformer`.

x (B, N, 512), 8 heads, forward and forward + backward, median of --repeats after a warm-up.
CPU: fp32. CUDA: bf16, peak memory, and the attention core against a bare compiled FlexAttention
call with the same BlockMask (the "within 1.2x of FlexAttention" goal).

    python benchmarks/fixed_patterns.py --lengths 1024 4096
    python benchmarks/fixed_patterns.py --device cuda --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import efficient_transformers as et

CONFIGS = [
    ("transformer", {}),
    ("image_transformer", {"mode": "1d"}),
    ("image_transformer", {"mode": "2d"}),
    ("sparse_transformer", {"pattern": "strided"}),
    ("sparse_transformer", {"pattern": "fixed"}),
    ("axial_transformer", {}),
    ("memory_compressed", {"kind": "compressed"}),
    ("memory_compressed", {"kind": "local"}),
]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_layer(name, options, n, causal, device, dtype, repeats):
    torch.manual_seed(0)
    attn = et.build_attention(name, dim=512, heads=8, causal=causal, **options).to(device, dtype)
    x = torch.randn(1, n, 512, device=device, dtype=dtype, requires_grad=True)

    def fwd():
        with torch.no_grad():
            attn(x)

    def fwd_bwd():
        attn(x).float().square().mean().backward()

    row = {"fwd_ms": timed(fwd, device, repeats)}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row["fwd_bwd_ms"] = timed(fwd_bwd, device, repeats)
    if device == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return attn, row


def bench_bare_flex(attn, n, device, dtype, repeats):
    """Our attention core vs a bare compiled flex_attention with the same BlockMask, fwd+bwd."""
    from torch.nn.attention.flex_attention import flex_attention

    from efficient_transformers.functional import flex

    from efficient_transformers.functional.patterns import BlockLocal

    if attn.spec.name == "sparse_transformer":
        pattern = attn.patterns()[0] if attn.combine == "merged" else None
    elif attn.spec.name == "memory_compressed":
        pattern = BlockLocal(attn.block_size, attn.causal) if attn.kind == "local" else None
    else:
        pattern = attn.pattern(n)
    if pattern is None:
        return None
    core = attn.local_core if attn.spec.name == "memory_compressed" else attn.core
    q, k, v = (torch.randn(1, 8, n, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = flex.pattern_block_mask(pattern, n, device)
    bare = torch.compile(flex_attention)
    ours = timed(lambda: core(q, k, v).sum().backward(), device, repeats)
    base = timed(lambda: bare(q, k, v, block_mask=mask).sum().backward(), device, repeats)
    return ours, base


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (anchors: 2)")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    for n in args.lengths:
        for name, options in CONFIGS:
            if args.only and name not in args.only:
                continue
            label = f"{name}{options}" if options else name
            try:
                attn, row = bench_layer(name, options, n, args.causal, args.device, dtype, args.repeats)
            except Exception as err:  # a report line, not a crash
                print(f"N={n} causal={args.causal} {label}: FAILED {type(err).__name__}: {err}")
                continue
            extra = ""
            if args.device == "cuda" and name != "transformer":
                ratio = bench_bare_flex(attn, n, args.device, dtype, args.repeats)
                if ratio:
                    extra = f" core {ratio[0]:.3f} ms vs bare flex {ratio[1]:.3f} ms ({ratio[0] / ratio[1]:.2f}x)"
            stats = " ".join(f"{k}={v:.1f}" for k, v in row.items())
            print(f"N={n} causal={args.causal} {label}: {stats}{extra}", flush=True)


if __name__ == "__main__":
    main()
