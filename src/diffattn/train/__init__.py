"""Training (issue #3): ``TrainConfig`` and run files, AdamW + schedules, the trainer with exact resume,
atomic checkpoints, DDP/FSDP2 under torchrun. See docs/training.md."""

from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import RECIPES, SCHEDULES, TrainConfig, load_run_file, resolve_model_config
from .plan import RunPlan, plan_configs, plan_run
from .trainer import StepResult, Trainer, lm_loss, run_lock, train

__all__ = ["TrainConfig", "RECIPES", "SCHEDULES", "Trainer", "StepResult", "RunPlan", "plan_run", "plan_configs",
           "run_lock", "train", "lm_loss",
           "load_run_file", "resolve_model_config", "save_checkpoint", "load_checkpoint", "latest_checkpoint",
           "list_checkpoints"]
