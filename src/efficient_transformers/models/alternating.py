"""The T-DMCA stack of Liu et al. 2018 ("Generating Wikipedia by Summarizing Long Sequences",
section 4.2.4): layers alternate local attention and memory-compressed attention, starting and
ending with local ones (the paper's 5-layer "LMLML").

`build_model("memory_compressed", kind=None, ...)`: layer i is "local" for even i and
"compressed" for odd i; `kind="local"` or `"compressed"` uses that kind in every layer.
"""

from __future__ import annotations

from ..attention.base import check_choice
from ..registry import attention_spec, build_attention, register_model
from .transformer import TaskModel, build_generic_model


def alternating_kinds(depth: int) -> list[str]:
    return ["local" if i % 2 == 0 else "compressed" for i in range(depth)]


@register_model("memory_compressed")
def build_alternating_model(name: str, task: str = "lm", *, kind: str | None = None,
                            **kwargs) -> TaskModel:
    """The generic model whose attention layers alternate local / compressed (kind None)."""
    if kind is not None:
        check_choice("kind", kind, ("compressed", "local"))
        model = build_generic_model(name, task, kind=kind, **kwargs)
        return model
    model = build_generic_model(name, task, **kwargs)
    valid = attention_spec(name).options
    options = {k: v for k, v in kwargs.items() if k in valid}
    for block, layer_kind in zip(model.encoder.blocks, alternating_kinds(len(model.encoder.blocks))):
        old = block.attention
        if old.kind != layer_kind:
            block.attention = build_attention(name, dim=old.dim, heads=old.heads, causal=old.causal,
                                              **{**options, "kind": layer_kind})
    model.config["kind"] = None
    return model
