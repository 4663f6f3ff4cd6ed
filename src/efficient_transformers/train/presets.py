"""Training presets per task: `lra` (the LRA paper's base configurations) and `small` (minutes on
2 CPU cores). Explicit command-line values override a preset; a preset overrides DEFAULTS.

`lra`, from the LRA repository's configs (lra_benchmarks/*/configs/base_*_config.py and the
transformer_base overrides), with ListOps sized as the paper's Table (ANCHORS.md: 4 layers, dim
512, 8 heads, MLP 1024; the repository's config file says 6 layers, MLP 2048). Schedules are the
repository's: "constant * linear_warmup * rsqrt_decay" (listops/text/retrieval, lr 0.05) and
"constant * linear_warmup * cosine_decay" (image/pathfinder). Our models use qkv_dim = dim.
mqar follows Zoology's small setting (2 layers, vocabulary 8192, 64 pairs at length 512).

`small`: short sequences, width 64-128, 2 layers, a few hundred steps; tuned so the dense
`transformer` is clearly above chance on generated ListOps and MQAR in a few CPU minutes.
"""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = dict(
    steps=1000, batch_size=32, seq_len=512, lr=1e-3, warmup=None, schedule="cosine",
    weight_decay=0.01, clip=1.0, eval_every=None, save_every=None, log_every=10,
    eval_examples=None, model=dict(dim=128, depth=2, heads=4), task_options={},
)

# without a preset: the length the images have (32 x 32 pixels, LRA's image and pathfinder32)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"image": dict(seq_len=1024),
                                             "pathfinder": dict(seq_len=1024)}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "lra": {
        "listops": dict(steps=5000, batch_size=32, seq_len=2000, lr=0.05, warmup=1000,
                        schedule="rsqrt", weight_decay=0.1, eval_every=500,
                        model=dict(dim=512, depth=4, heads=8, mlp_dim=1024, pooling="cls"),
                        task_options=dict(min_length=500, max_length=2000, train_examples=96000)),
        "text": dict(steps=20000, batch_size=32, seq_len=1000, lr=0.05, warmup=8000,
                     schedule="rsqrt", weight_decay=0.1, eval_every=1000,
                     model=dict(dim=256, depth=4, heads=4, mlp_dim=1024, pooling="cls")),
        "retrieval": dict(steps=5000, batch_size=32, seq_len=4000, lr=0.05, warmup=8000,
                          schedule="rsqrt", weight_decay=0.1, eval_every=500,
                          model=dict(dim=128, depth=4, heads=4, mlp_dim=512, pooling="cls")),
        "image": dict(steps=35000, batch_size=256, seq_len=1024, lr=5e-4, warmup=175,
                      schedule="cosine", weight_decay=0.0, clip=0.0, eval_every=175,
                      model=dict(dim=32, depth=1, heads=1, mlp_dim=64, dropout=0.3,
                                 pooling="cls", positions="learned")),
        "pathfinder": dict(steps=62400, batch_size=512, seq_len=1024, lr=1e-3, warmup=312,
                           schedule="cosine", weight_decay=0.0, clip=0.0, eval_every=312,
                           model=dict(dim=128, depth=1, heads=4, mlp_dim=128, dropout=0.2,
                                      pooling="mean", positions="sinusoidal"),
                           task_options=dict(train_examples=160000)),
        "mqar": dict(steps=5000, batch_size=64, seq_len=512, lr=1e-3, warmup=500,
                     eval_every=500, model=dict(dim=128, depth=2, heads=4),
                     task_options=dict(vocab_size=8192, pairs=64)),
    },
    "small": {
        "listops": dict(steps=400, batch_size=32, seq_len=128, lr=1e-3, warmup=40,
                        eval_every=100, eval_examples=300,
                        model=dict(dim=64, depth=2, heads=4, mlp_dim=128),
                        task_options=dict(min_length=16, max_length=128, max_depth=4,
                                          max_args=5, train_examples=8000)),
        "text": dict(steps=500, batch_size=16, seq_len=512, lr=1e-3, warmup=50, eval_every=100,
                     eval_examples=500, model=dict(dim=64, depth=2, heads=4, mlp_dim=128)),
        "retrieval": dict(steps=500, batch_size=16, seq_len=256, lr=1e-3, warmup=50,
                          eval_every=100, eval_examples=500,
                          model=dict(dim=64, depth=2, heads=4, mlp_dim=128)),
        "image": dict(steps=500, batch_size=32, seq_len=1024, lr=1e-3, warmup=50, eval_every=100,
                      eval_examples=500, model=dict(dim=32, depth=1, heads=2, mlp_dim=64)),
        "pathfinder": dict(steps=500, batch_size=32, seq_len=1024, lr=1e-3, warmup=50,
                           eval_every=100, eval_examples=500,
                           model=dict(dim=32, depth=1, heads=2, mlp_dim=64, pooling="mean"),
                           task_options=dict(train_examples=8000)),
        "mqar": dict(steps=400, batch_size=32, seq_len=64, lr=3e-3, warmup=40, eval_every=100,
                     eval_examples=300, model=dict(dim=64, depth=2, heads=2, mlp_dim=128),
                     task_options=dict(vocab_size=32, pairs=4)),
    },
}


def resolve(task: str, preset: str | None, explicit: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS < TASK_DEFAULTS[task] < PRESETS[preset][task] < explicit (values that are not
    None); the nested `model` and `task_options` dicts merge key by key."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
    layers = [DEFAULTS, TASK_DEFAULTS.get(task, {}), PRESETS[preset].get(task, {}) if preset else {},
              explicit]
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if isinstance(value, dict):
                out[key] = {**out.get(key, {}), **{k: v for k, v in value.items() if v is not None}}
            else:
                out[key] = value
    if out.get("warmup") is None:
        out["warmup"] = max(1, out["steps"] // 10)
    if out.get("eval_every") is None:
        out["eval_every"] = max(1, out["steps"] // 10)
    if out.get("save_every") is None:
        out["save_every"] = out["eval_every"]
    return out
