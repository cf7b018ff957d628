"""jaxlora: LoRA fine-tuning for JAX/Flax, centred on the choice of initialization."""

from jaxlora._node import Layout
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import is_lora

__all__ = [
    "Layout",
    "LoraSpec",
    "LoraWeight",
    "is_lora",
]
