"""spinal-transfer: fine-tune pretrained torchvision/timm classifiers with a SpinalNet head."""
__version__ = "0.1.0"

from .config import TrainConfig
from .export import load
from .heads import LinearHead, MLPHead, SpinalHead, create_head
from .surgery import build_model, get_head, list_backbones

__all__ = ["TrainConfig", "SpinalHead", "MLPHead", "LinearHead", "create_head", "build_model", "get_head",
           "list_backbones", "load", "__version__"]
