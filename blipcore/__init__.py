"""BLIP Lab's library: a from-scratch BLIP, its data, decoding, metrics, explanations and runs."""

from .model.blip import BLIP
from .model.config import BlipConfig, DataConfig, ModelConfig, TrainConfig
from .model.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["BLIP", "BlipConfig", "DataConfig", "ModelConfig", "TrainConfig", "load_tokenizer", "__version__"]
