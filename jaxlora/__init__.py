"""jaxlora: LoRA fine-tuning for JAX/Flax, centred on the choice of initialization."""

from jaxlora._apply import lora_apply
from jaxlora._checkpoint import load, save
from jaxlora._init import init
from jaxlora._merge import Adapters, adapters, base, combine, merge
from jaxlora._node import Layout, LoraSpec, LoraWeight, is_lora
from jaxlora._optax import freeze_base, lora_plus, param_labels, trainable_mask
from jaxlora._schemes import SCHEMES, OrthogonalScheme, Scheme

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "Adapters",
    "Layout",
    "LoraSpec",
    "LoraWeight",
    "OrthogonalScheme",
    "Scheme",
    "adapters",
    "base",
    "combine",
    "freeze_base",
    "init",
    "is_lora",
    "load",
    "lora_apply",
    "lora_plus",
    "merge",
    "param_labels",
    "save",
    "trainable_mask",
]
