"""jaxlora: LoRA fine-tuning for JAX/Flax, centred on the choice of initialization."""

from jaxlora._apply import explain
from jaxlora._apply import lora_apply
from jaxlora._checkpoint import load
from jaxlora._checkpoint import save
from jaxlora._eva_init import EvaConfig
from jaxlora._init import init
from jaxlora._linalg import svd_lowrank
from jaxlora._merge import Adapters
from jaxlora._merge import adapters
from jaxlora._merge import base
from jaxlora._merge import combine
from jaxlora._merge import merge
from jaxlora._nnx import NnxOptimizer
from jaxlora._nnx import nnx_named_sharding
from jaxlora._nnx import nnx_partition_spec
from jaxlora._node import Conv
from jaxlora._node import Layout
from jaxlora._node import LoraSpec
from jaxlora._node import LoraWeight
from jaxlora._node import is_lora
from jaxlora._optax import apply_updates
from jaxlora._optax import freeze_base
from jaxlora._optax import lora_plus
from jaxlora._optax import param_labels
from jaxlora._optax import schedule_free_eval_params
from jaxlora._optax import trainable_mask
from jaxlora._peft import load_peft
from jaxlora._peft import save_peft
from jaxlora._residual import to_plain_lora
from jaxlora._schemes import SCHEMES
from jaxlora._schemes import OrthogonalScheme
from jaxlora._schemes import Scheme

__version__ = "0.1.0"

__all__ = [
    "SCHEMES",
    "Adapters",
    "Conv",
    "EvaConfig",
    "Layout",
    "LoraSpec",
    "LoraWeight",
    "NnxOptimizer",
    "OrthogonalScheme",
    "Scheme",
    "adapters",
    "apply_updates",
    "base",
    "combine",
    "explain",
    "freeze_base",
    "init",
    "is_lora",
    "load",
    "load_peft",
    "lora_apply",
    "lora_plus",
    "merge",
    "nnx_named_sharding",
    "nnx_partition_spec",
    "param_labels",
    "save",
    "save_peft",
    "schedule_free_eval_params",
    "svd_lowrank",
    "to_plain_lora",
    "trainable_mask",
]
