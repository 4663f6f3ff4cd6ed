"""Training: the trainer (AdamW, warm-up and decay, clipping, bf16 on CUDA, evaluation,
metrics.jsonl), atomic pickle-free checkpoints with exact resume, DDP under torchrun, presets."""

from .presets import PRESETS, resolve
from .trainer import TrainConfig, evaluate, lr_at, read_metrics, train

__all__ = ["PRESETS", "TrainConfig", "evaluate", "lr_at", "read_metrics", "resolve", "train"]
