"""pelab models: pure PyTorch, importable without Lightning or Hydra."""

from pelab.models.config import GPTConfig
from pelab.models.gpt import GPT
from pelab.models.pe import available as available_pes
from pelab.models.pe import build_pe

__all__ = ["GPT", "GPTConfig", "available_pes", "build_pe"]
