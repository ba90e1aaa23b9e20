"""What every model family file uses: checking a dataclass of arguments as the manifest names its
fields, and the description of one checkpoint tensor."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError


def check_fields(spec, section: str) -> None:
    """Raise ConfigError naming the first field of the dataclass ``spec`` (as the manifest does:
    ``section.field``) whose value has the wrong type or range: a hand-edited manifest or
    config.json fails here rather than later as a numpy or onnxruntime error. Integers must be >= 1
    and numbers finite and > 0, unless a field's metadata says otherwise (``min``, ``max``,
    ``choices``); nested specs check themselves."""
    for f in dataclasses.fields(spec):
        value, meta = getattr(spec, f.name), f.metadata
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if f.type == "bool":
            ok, need = isinstance(value, bool), "true or false"
        elif f.type == "int":
            low = meta.get("min", 1)
            ok, need = number and isinstance(value, int) and value >= low, f"an integer >= {low}"
        elif f.type == "float":
            high = meta.get("max", math.inf)
            ok = number and math.isfinite(value) and 0 < value <= high
            need = "a number > 0" + (f" and <= {high}" if high < math.inf else "")
        elif f.type == "str":
            choices = meta.get("choices")
            ok = isinstance(value, str) and (choices is None or value in choices)
            need = f"one of {', '.join(map(repr, choices))}" if choices else "a string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{section}.{f.name} must be {need}, not {value!r}")


@dataclass(frozen=True)
class Weight:
    """One tensor of an original checkpoint: its name, shape, and what kind of values it holds (how
    internvl-make-tiny draws random ones: linear, norm, bias, scale or embed)."""

    name: str
    shape: tuple[int, ...]
    kind: str
