"""pelab models: pure PyTorch, importable without Lightning or Hydra."""
from models.config import GPTConfig
from models.gpt import GPT
from models.pe import available as available_pes, build_pe

__all__ = ["GPT", "GPTConfig", "available_pes", "build_pe"]
