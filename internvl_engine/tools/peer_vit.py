"""The image paths ``internvl-bench --compare openvino llama.cpp`` times beside this engine's.

OpenVINO (``requirements/peers-image.txt``) runs the same checkpoint's ViT graph, in fp32 and in the
int8 that NNCF's post-training quantisation makes of it (weights and activations, attention's matrix
products included: what Intel recommends for vision encoders on a CPU).

OpenVINO reads the plain-operator ``vit.onnx`` (the dynamic and axmodel layouts' fp32 ViT: the
fused layout's MultiHeadAttention is an onnxruntime operator), built here from the checkpoint, so
both sides compute the same function of the same weights. NNCF calibrates on tiles of the bench's
own random pictures, preprocessed as the engine does.

llama.cpp's multimodal library (mtmd, through llama-cpp-python's bindings) runs the whole image
question: its converter's vision GGUF of the checkpoint (``--mmproj``, F16 or Q8_0, written by
``scripts/make_gguf.py --mmproj``) beside the decoder's GGUF, fed the same one-tile pictures the
engine encodes, with the engine's chat prompt.

Development only: nothing here is imported at run time.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..config import DEFAULT_SYSTEM_PROMPT, ModelSpec, read_hf_config
from ..errors import InternVLError
from ..preprocess import normalize, tiles
from ..prompt import chat_prompt, image_lines, image_placeholder

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


def llama_cpp_missing() -> str | None:
    """Why llama.cpp's multimodal path cannot be compared here, or None."""
    try:
        from llama_cpp import mtmd_cpp  # noqa: F401
    except ImportError as e:
        return (
            f"{e.name} is not installed (pip install llama-cpp-python==0.3.36: it compiles "
            "llama.cpp and its mtmd library, minutes)"
        )
    except OSError as e:  # its shared libraries failed to load
        return f"llama-cpp-python's libraries do not load: {e}"
    return None


class LlamaCppMtmd:
    """llama.cpp's image question: ``ask(question, tiles)`` evaluates the chat prompt with each tile
    as an image through mtmd (vision encoder, then the decoder's prefill) and returns the first
    token; ``encode(tile)`` runs the vision encoder alone and returns its features."""

    def __init__(self, gguf: Path, mmproj: Path, threads: int, context: int = 4096):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.llama_cpp, self.mtmd = llama_cpp, mtmd_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=context,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self.ctx:
            raise InternVLError(f"llama.cpp's mtmd could not load {mmproj} beside {gguf}")
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self.n_embd = self.llm.n_embd()
        self.label = f"llama-cpp-python {llama_cpp.__version__} mtmd, {mmproj.name}"

    def close(self) -> None:
        if self.ctx:
            self.mtmd.mtmd_free(self.ctx)
            self.ctx = None
        self.llm.close()

    def prompt(self, question: str, images: int) -> str:
        """The engine's chat prompt, each image's ``<img>...</img>`` as mtmd's marker (mtmd writes
        InternVL's ``<img>`` and ``</img>`` around the image's tokens itself)."""
        lines = image_lines([1] * images, 1).replace(image_placeholder(1, 1), self.marker)
        return chat_prompt(DEFAULT_SYSTEM_PROMPT, lines + question)

    def _chunks(self, text: str, tile_list: list[np.ndarray]):
        mtmd = self.mtmd
        bitmaps = []
        for tile in tile_list:
            pixels = np.ascontiguousarray(tile, dtype=np.uint8)
            data = pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
            bitmap = mtmd.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0], data)
            if not bitmap:
                for made in bitmaps:
                    mtmd.mtmd_bitmap_free(made)
                raise InternVLError(f"llama.cpp's mtmd refused a {pixels.shape} picture")
            bitmaps.append(bitmap)
        encoded = text.encode()
        words = mtmd.mtmd_input_text(encoded, len(encoded), True, True)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            status = mtmd.mtmd_tokenize(self.ctx, chunks, ctypes.byref(words), array, len(bitmaps))
        finally:
            for bitmap in bitmaps:  # the chunks hold the preprocessed images
                mtmd.mtmd_bitmap_free(bitmap)
        if status:
            mtmd.mtmd_input_chunks_free(chunks)
            raise InternVLError(f"llama.cpp's mtmd could not tokenize the prompt (status {status})")
        return chunks

    def _image_chunks(self, chunks) -> list:
        mtmd = self.mtmd
        every = [
            mtmd.mtmd_input_chunks_get(chunks, i)
            for i in range(mtmd.mtmd_input_chunks_size(chunks))
        ]
        return [
            c
            for c in every
            if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        ]

    def encode(self, tile: np.ndarray) -> np.ndarray:
        """The vision encoder's features of one tile, [tokens, n_embd]."""
        mtmd = self.mtmd
        chunks = self._chunks(self.marker, [tile])
        try:
            (image,) = self._image_chunks(chunks)
            if mtmd.mtmd_encode_chunk(self.ctx, image):
                raise InternVLError("llama.cpp's mtmd could not encode the image")
            tokens = mtmd.mtmd_input_chunk_get_n_tokens(image)
            out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.ctx), (tokens, self.n_embd))
            return out.copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def ask(self, question: str, tile_list: list[np.ndarray]) -> dict:
        """The image question, as the engine's bench times it: from pictures to the first token
        (greedy). Returns the token, the prompt's length, the image tokens and the vision encoder's
        share, timed on its own beforehand (mtmd encodes again inside the question)."""
        mtmd, llama_cpp = self.mtmd, self.llama_cpp
        chunks = self._chunks(self.prompt(question, len(tile_list)), tile_list)
        try:
            vit_s = 0.0
            for image in self._image_chunks(chunks):
                started = time.perf_counter()
                if mtmd.mtmd_encode_chunk(self.ctx, image):
                    raise InternVLError("llama.cpp's mtmd could not encode the image")
                vit_s += time.perf_counter() - started
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()  # the question starts at position 0, as the engine's
        started = time.perf_counter()
        chunks = self._chunks(self.prompt(question, len(tile_list)), tile_list)
        try:
            n_past = llama_cpp.llama_pos(0)
            status = mtmd.mtmd_helper_eval_chunks(
                self.ctx, self.llm._ctx.ctx, chunks, 0, 0, self.llm.n_batch, True,
                ctypes.byref(n_past),
            )  # fmt: skip
            if status:
                raise InternVLError(f"llama.cpp's mtmd could not evaluate the prompt ({status})")
            logits = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
            token = int(np.argmax(np.ctypeslib.as_array(logits, (self.llm.n_vocab(),))))
            ttft_s = time.perf_counter() - started
            image_tokens = sum(
                mtmd.mtmd_input_chunk_get_n_tokens(c) for c in self._image_chunks(chunks)
            )
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
        return {
            "token": token,
            "ttft_s": ttft_s,
            "vit_s": vit_s,
            "prompt_tokens": n_past.value,
            "image_tokens": image_tokens,
        }
