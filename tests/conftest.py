"""Shared test setup: import this checkout's jaxlora and run JAX strictly."""

import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

jax.config.update("jax_numpy_rank_promotion", "raise")
