"""Training: data, methods (lora, qlora, full, adapter, prefix, prompt, bitfit), the loop,
checkpoints and resume, several processes (DDP, FSDP2). Entry point: `train(TrainConfig(...))`."""
from lorafleet.train.config import TrainConfig
from lorafleet.train.data import DataConfig, load_dataset
from lorafleet.train.methods import METHODS, MethodConfig, apply_method, load_trained, save_trained
from lorafleet.train.trainer import TrainResult, train

__all__ = ["DataConfig", "load_dataset", "METHODS", "MethodConfig", "apply_method",
           "load_trained", "save_trained", "TrainConfig", "TrainResult", "train"]
