"""An original InternVL checkpoint's weights (safetensors, single or sharded), read lazily as
float32."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", the dtype of released checkpoints)
import numpy as np

from ..errors import ModelDirError


class Checkpoint:
    """Lazy float32 access to an original InternVL safetensors checkpoint (single or sharded)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (hf_dir / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            raise ModelDirError(f"{hf_dir}: no model.safetensors (or model.safetensors.index.json)")
        self.files = [hf_dir / s for s in shards]
        self._where = {}
        try:
            for f in self.files:
                handle = safe_open(str(f), framework="numpy")
                self._where.update({k: handle for k in handle.keys()})
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelDirError(f"{hf_dir}: cannot read safetensors ({e})") from e

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise ModelDirError(
                f"checkpoint lacks tensor {name!r} (not the original InternVL2.5 layout?)"
            )
        return np.asarray(self._where[name].get_tensor(name), dtype=np.float32)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        return h.hexdigest()
