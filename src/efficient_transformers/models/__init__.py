"""Models generic over any registered attention, plus the mechanism-specific ones
(each module may call `register_model`; importing this package imports them all)."""

from ..discover import import_submodules
from .transformer import (  # noqa: F401
    Block, Classifier, DualEncoder, Encoder, LanguageModel, ModelOutput, build_generic_model,
)

import_submodules(__name__, __path__)
