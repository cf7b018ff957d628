"""PEFT's ``adapter_config.json`` for LoRA: written for jaxlora's targets, and read
the way PEFT reads it (which modules it adapts, each module's rank and alpha),
refusing what plain LoRA factors cannot hold."""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any

from jaxlora._node import LoraSpec

CONFIG = "adapter_config.json"


def write(modules: dict[str, LoraSpec]) -> dict:
    """PEFT's LoraConfig for these modules: the most common rank and alpha, the
    others by exact-name patterns; scales are kept exactly (an rsLoRA module among
    plain ones gets the alpha that gives its scale at ``alpha / r``)."""
    rslora = all(s.rslora for s in modules.values())
    alpha = {
        n: s.alpha if s.rslora == rslora else s.scale * s.rank
        for n, s in modules.items()
    }
    common = lambda xs: collections.Counter(xs).most_common(1)[0][0]  # noqa: E731
    ranks = {n: s.rank for n, s in modules.items()}
    r, lora_alpha = common(ranks.values()), common(alpha.values())
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": sorted(modules),
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": rslora,
        "rank_pattern": patterns(ranks, r),
        "alpha_pattern": patterns(alpha, lora_alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def patterns(values: dict[str, Any], default) -> dict[str, Any]:
    r"""A PEFT pattern dict giving each module its value. PEFT takes the first key
    ``k`` with ``(.*\.)?(k)$`` matching a module name, so a key also catches every
    module whose name ends in ``.k`` (and a torch model wrapped under a prefix
    still matches): such modules get keys of their own, and longer keys come
    first."""
    keys = {n for n, v in values.items() if v != default}
    keys |= {m for m in values if any(m.endswith(f".{k}") for k in keys)}
    order = sorted(keys, key=lambda n: (-len(n), n))
    return {re.escape(n): values[n] for n in order}


# config fields that do not change what the factors compute (or that are read here)
_NEUTRAL = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "revision",
    "base_model_name_or_path", "inference_mode", "r", "lora_alpha", "lora_dropout",
    "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "fan_in_fan_out", "init_lora_weights", "megatron_config",
    "megatron_core", "eva_config", "loftq_config", "corda_config", "lora_ga_config",
    "use_qalora", "qalora_group_size", "ensure_weight_tying", "layers_pattern",
}  # fmt: skip
# (not {}: an empty ``*_config`` may switch a variant on with its defaults)
_NEUTRAL_VALUES = (None, False, "none", [], "")


def _neutral(v) -> bool:
    """Whether ``v`` is one of `_NEUTRAL_VALUES` by type as well as value (``0 ==
    False``: ``layers_to_transform=0`` is layer 0, not "every layer")."""
    return any(type(v) is type(n) and v == n for n in _NEUTRAL_VALUES)


#: init_lora_weights that leave a residual in the base weights the adapter needs
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def pattern_value(keys: dict, name: str, default):
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in keys.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read(path: str) -> dict:
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"No PEFT adapter at {path!r}: {CONFIG} is missing."
            if os.path.isdir(path)
            else f"No PEFT adapter at {path!r}: no such directory."
        )
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{file!r} is not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(
            f"{file!r} has peft_type {got!r}; only LoRA adapters ('LORA') load."
        )
    bad = [
        f"{k}={v!r}" for k, v in config.items() if k not in _NEUTRAL and not _neutral(v)
    ]
    if bad:
        raise ValueError(
            f"{file!r} sets {', '.join(bad)}: plain LoRA factors cannot hold that "
            "(DoRA, trained biases, modules_to_save, layers_to_transform, layer "
            "replication, parameter targets, trainable tokens and the LoRA variants "
            "load only in PEFT)."
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_RESIDUAL_INITS):
        raise ValueError(
            f"{file!r} was initialized with {config['init_lora_weights']!r}, which "
            "rewrites the base weights: the adapter applies to that residual base, "
            "not to the model's weights. Save it from PEFT converted to plain LoRA "
            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        )
    problems = []
    r = config.get("r")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        problems.append(f"r={r!r} (a positive integer)")
    alpha = config.get("lora_alpha")
    if not (
        isinstance(alpha, (int, float))
        and not isinstance(alpha, bool)
        and 0 < alpha < math.inf
    ):  # 0 would be an adapter with no effect, a negative one reversed, NaN NaNs
        problems.append(f"lora_alpha={alpha!r} (a finite number > 0)")
    for field, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            problems.append(f"{field}={pattern!r} (a dict)")
            continue
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                problems.append(f"{field} key {key!r} ({e})")
            if (
                not isinstance(value, kind)
                or isinstance(value, bool)
                or not 0 < value < math.inf
            ):
                problems.append(f"{field}[{key!r}]={value!r}")
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                problems.append(f"{field}={value!r} ({e})")
        elif value is not None and not all(isinstance(v, str) for v in value):
            problems.append(f"{field}={value!r} (module names or one regex)")
    if problems:
        raise ValueError(f"{file!r} has invalid fields: {', '.join(problems)}.")
    return config


def targeted(config: dict, name: str) -> bool:
    """Whether PEFT adapts module ``name`` under ``config`` (its matching rules:
    a list matches a name or a dotted suffix, a string is a full regex match)."""

    def matches(spec):
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, name) is not None
        return any(name == k or name.endswith(f".{k}") for k in spec)

    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    return (targets is None or matches(targets)) and not (
        excluded and matches(excluded)
    )


def scale_of(config: dict, name: str, rank: int) -> float:
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
