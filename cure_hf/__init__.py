"""cure_hf: robust image classifiers with adversarial training (CURE, TRADES, PGD-AT, MART, FGSM-RS)
inside the Hugging Face Trainer."""

from . import cifar_models  # noqa: F401 (registers cifar_resnet18, cifar_preact_resnet18, cifar_wide_resnet34_10)
from .components import Component
from .config import CURETrainingArguments
from .data import collate_pixels, image_transform, load_digits_dataset, load_image_dataset, set_preprocessing
from .methods import AdversarialMethod, AttackSpec, AWPDefaults, get_method, register_method, registered_methods
from .models import PixelNormalized, create_model, find_head_modules, load_model
from .streaming import StreamingImageDataset, load_streaming_image_dataset
from .trainer import CURETrainer

__version__ = "0.1.0"

__all__ = [
    "CURETrainer",
    "CURETrainingArguments",
    "AdversarialMethod",
    "AttackSpec",
    "AWPDefaults",
    "Component",
    "register_method",
    "get_method",
    "registered_methods",
    "PixelNormalized",
    "create_model",
    "load_model",
    "find_head_modules",
    "load_digits_dataset",
    "load_image_dataset",
    "load_streaming_image_dataset",
    "StreamingImageDataset",
    "image_transform",
    "collate_pixels",
    "set_preprocessing",
]
