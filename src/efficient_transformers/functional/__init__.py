"""Pure tensor code: (q, k, v, ...) -> out [, state]. No nn.Module here."""
