"""One module per registry key; importing this package registers every mechanism in it."""

from ..discover import import_submodules

import_submodules(__name__, __path__)
