"""NoPE: no positional information besides the causal mask."""

from pelab.models.pe import register
from pelab.models.pe.base import PositionalEncoding


@register("nope")
class NoPE(PositionalEncoding):
    def __init__(self, shape, **shared):
        super().__init__(shape, **shared)
