"""Training: config, data, the sharded train step, checkpoints and metrics."""

from pallax.train.checkpoint import Checkpointer, load_model
from pallax.train.config import TrainConfig, load_config, preset_config
from pallax.train.data import ByteTokenizer, default_corpus, load_tokenizer
from pallax.train.metrics import device_peak_tflops, training_flops_per_token
from pallax.train.trainer import Trainer, cross_entropy

__all__ = [
    "ByteTokenizer",
    "Checkpointer",
    "TrainConfig",
    "Trainer",
    "cross_entropy",
    "default_corpus",
    "device_peak_tflops",
    "load_config",
    "load_model",
    "load_tokenizer",
    "preset_config",
    "training_flops_per_token",
]
