"""recipe: a declarative fine-tuning runner (TOML recipe -> staged, resumable plan)."""

__version__ = "0.1.0"
