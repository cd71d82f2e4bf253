"""Renamed arguments: a deprecated name keeps working for one release and warns with a DeprecationWarning."""

from __future__ import annotations

import warnings
from typing import Any, Tuple


def renamed(where: str, name: str, value: Any, deprecated: str, deprecated_value: Any, *, stacklevel: int = 3
            ) -> Tuple[Any, str]:
    """The value of argument ``name`` of ``where``, given under ``name`` or under its deprecated name.

    ``None`` means "not given" for either name. The deprecated name alone gives its value and a DeprecationWarning
    that points ``stacklevel`` frames up (3: the caller of the function that calls this); both names raise
    ValueError. Returns (value, the name the caller used), so that a later check of the value can name what the
    caller wrote.
    """
    if deprecated_value is None:
        return value, name
    if value is not None:
        raise ValueError(f"{where}: got both {name}= and its deprecated name {deprecated}=; pass only {name}=.")
    warnings.warn(f"{where}: {deprecated}= is deprecated and will be removed in the next release; use {name}= "
                  f"(same meaning).", DeprecationWarning, stacklevel=stacklevel)
    return deprecated_value, deprecated
