"""rlhf: RL fine-tuning of causal LMs with LoRA.

    from rlhf import RLConfig, RLTrainer      # the Python API, shaped like TRL's GRPOConfig/GRPOTrainer
"""

from typing import Any

__all__ = ["RLConfig", "RLTrainer"]


def __getattr__(name: str) -> Any:
    # Lazy: `import rlhf` (e.g. for rlhf.config in a script's argument parsing) must not load
    # transformers and the trainer.
    if name == "RLConfig":
        from rlhf.config import RLConfig

        return RLConfig
    if name == "RLTrainer":
        from rlhf.trainer import RLTrainer

        return RLTrainer
    raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
