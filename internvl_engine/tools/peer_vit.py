"""The image encoder ``internvl-bench --compare openvino`` times beside this engine's: OpenVINO
(``requirements/peers-image.txt``) on the same checkpoint's ViT graph, in fp32 and in the int8 that
NNCF's post-training quantisation makes of it (weights and activations, attention's matrix
products included: what Intel recommends for vision encoders on a CPU).

OpenVINO reads the plain-operator ``vit.onnx`` (the dynamic and axmodel layouts' fp32 ViT: the
fused layout's MultiHeadAttention is an onnxruntime operator), built here from the checkpoint, so
both sides compute the same function of the same weights. NNCF calibrates on tiles of the bench's
own random pictures, preprocessed as the engine does.

Development only: nothing here is imported at run time.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import ModelSpec, read_hf_config
from ..errors import InternVLError
from ..preprocess import normalize, tiles

CALIBRATION_TILES = 8  # NNCF's statistics: 8 tiles took 83 s at InternViT-300M's size (2 cores)


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be compared here, or None."""
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -r requirements/peers-image.txt)"
    return None


class OpenVinoVit:
    """The checkpoint's ViT in OpenVINO: ``run(tile)`` -> features, ``precision`` fp32 or int8."""

    def __init__(self, hf_model: Path, precision: str, threads: int, calibration: list):
        import openvino as ov

        from .checkpoint import Checkpoint
        from .export import build_vit
        from .graph import save_model

        spec = ModelSpec.from_hf_config(read_hf_config(hf_model))
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="internvl-openvino-") as scratch:
            path = Path(scratch) / "vit.onnx"
            save_model(build_vit(Checkpoint(hf_model), spec), path)
            model = core.read_model(str(path))
        self.quantize_s = 0.0
        if precision == "int8":
            import nncf

            started = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # its progress bars: not in --json's
                model = nncf.quantize(
                    model,
                    nncf.Dataset(calibration),
                    subset_size=len(calibration),
                    model_type=nncf.ModelType.TRANSFORMER,
                )
            self.quantize_s = time.perf_counter() - started
        elif precision != "fp32":
            raise InternVLError(f"OpenVINO ViT precision {precision!r}: fp32 or int8")
        # fp32 arithmetic where the graph is fp32: OpenVINO would otherwise pick bf16 on CPUs that
        # have it, a precision this engine does not offer
        compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        self.request, self.output = compiled.create_infer_request(), compiled.output(0)
        self.precision = precision
        self.label = f"OpenVINO {ov.__version__.split('-')[0]} {precision}" + (
            " (NNCF)" if precision == "int8" else ""
        )

    def run(self, tile: np.ndarray) -> np.ndarray:
        return self.request.infer({0: tile})[self.output]


def one_tile_each(images: list[np.ndarray], image_size: int) -> list[np.ndarray]:
    """Each picture as the engine sends it in one tile: [1, 3, S, S], normalised (NNCF's
    calibration and the timed runs alike)."""
    return [normalize(tiles(image, image_size, 1)[:1]) for image in images]
