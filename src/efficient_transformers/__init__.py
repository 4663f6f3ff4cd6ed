"""efficient-transformers: the X-formers of "Efficient Transformers: A Survey" behind one API."""

from .attention.base import Attention, state_nbytes
from .models.pretrained import load_pretrained
from .registry import (
    AttentionSpec, attention_spec, build_attention, build_model, list_attention, list_models,
    register, register_model,
)
from .zoo import SURVEY_TABLE

__version__ = "0.1.0"

__all__ = [
    "Attention", "AttentionSpec", "SURVEY_TABLE", "attention_spec", "build_attention",
    "build_model", "list_attention", "list_models", "load_pretrained", "register",
    "register_model", "state_nbytes",
]
