"""The registry: one `AttentionSpec` per survey key, and the builders behind the public API."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .zoo import SURVEY_TABLE

# Arguments of every attention constructor that are not mechanism options.
CORE_ARGUMENTS = ("dim", "heads", "causal")


@dataclass(frozen=True)
class AttentionSpec:
    """The survey's facts for one mechanism plus its options and their defaults."""

    name: str
    title: str
    paper: str
    year: int
    taxonomy: tuple[str, ...]
    complexity: str
    decode: bool
    options: dict[str, Any] = field(default_factory=dict)


_ATTENTIONS: dict[str, type[nn.Module]] = {}
_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def constructor_options(cls: type) -> dict[str, Any]:
    """Keyword options of an attention class and their defaults (from its __init__ signature)."""
    options = {}
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.name in CORE_ARGUMENTS:
            continue
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            raise TypeError(f"{cls.__name__}.__init__ must list its options explicitly, not *{p.name}")
        options[p.name] = None if p.default is p.empty else p.default
    return options


def register(name: str):
    """Class decorator: register an attention class under a survey key."""
    if name not in SURVEY_TABLE:
        raise KeyError(f"{name!r} is not a key of the survey table; known: {sorted(SURVEY_TABLE)}")

    def decorate(cls):
        row = SURVEY_TABLE[name]
        cls.spec = AttentionSpec(name=name, title=row.title, paper=row.paper, year=row.year,
                                 taxonomy=row.taxonomy, complexity=row.complexity,
                                 decode=row.decode, options=constructor_options(cls))
        _ATTENTIONS[name] = cls
        return cls

    return decorate


def register_model(name: str):
    """Decorator: a builder `fn(name, task=..., **kwargs) -> nn.Module` replacing the generic model."""

    def decorate(fn):
        _MODEL_BUILDERS[name] = fn
        return fn

    return decorate


def _load_all() -> None:
    importlib.import_module("efficient_transformers.attention")
    importlib.import_module("efficient_transformers.models")


def list_attention() -> list[str]:
    """Registered attention names, in the survey's table order."""
    _load_all()
    return [name for name in SURVEY_TABLE if name in _ATTENTIONS]


def list_models() -> list[str]:
    """Names `build_model` accepts: every registered attention has a model."""
    return list_attention()


def attention_class(name: str) -> type[nn.Module]:
    _load_all()
    if name not in _ATTENTIONS:
        known = list_attention()
        hint = " (in the survey, not implemented yet)" if name in SURVEY_TABLE else ""
        raise ValueError(f"name: unknown attention {name!r}{hint}; expected one of {known}")
    return _ATTENTIONS[name]


def attention_spec(name: str) -> AttentionSpec:
    return attention_class(name).spec


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise TypeError naming unknown options and listing the valid ones."""
    valid = attention_spec(name).options
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for attention {name!r}; "
                        f"valid options: {sorted(valid)}")


def build_attention(name: str, dim: int = 256, heads: int = 4, causal: bool = False,
                    **options: Any) -> nn.Module:
    """Build the attention layer `name`: an nn.Module mapping (B, N, dim) -> (B, N, dim)."""
    cls = attention_class(name)
    check_options(name, options)
    return cls(dim=dim, heads=heads, causal=causal, **options)


def build_model(name: str, task: str = "lm", **kwargs: Any) -> nn.Module:
    """Build a model around attention `name`; see `models.transformer.build_generic_model`."""
    attention_class(name)  # clear error for an unknown name
    from .models.transformer import build_generic_model

    builder = _MODEL_BUILDERS.get(name, build_generic_model)
    return builder(name, task=task, **kwargs)
