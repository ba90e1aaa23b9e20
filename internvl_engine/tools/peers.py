"""The decoders ``internvl-bench --contexts`` times side by side: this engine's, and what a user
would run instead on a CPU (onnxruntime-genai, llama.cpp, transformers), all on the weights of one
checkpoint's Qwen2 decoder.

Each is driven the same way through a ``Decoder``: ``prefill(ids)`` runs a prompt of token ids and
returns the first greedy token, ``decode(token)`` feeds one token and returns the next. Text only:
the peers take token ids, not the engine's spliced image embeddings, so the comparison is of the
decoder, where a question's time goes once its images are encoded.

- ``engine``: a model directory of ``internvl-export`` (any contract or precision);
- ``onnxruntime-genai``: a model its builder made from the checkpoint's Qwen2 decoder
  (``build_genai``: its defaults for the CPU: blocks of 32, symmetric, int8 compute);
- ``llama.cpp`` (``llama-cpp-python``): a GGUF file converted from the same decoder
  (docs/benchmarks.md has the commands; optional: its wheel compiles llama.cpp for minutes);
- ``transformers``: its Qwen2 on the same decoder weights, fp32, eager attention.

Development only: nothing here is imported at run time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..config import Manifest, ModelLayout
from ..errors import InternVLError
from ..models import qwen2

GGUF_FILE_TYPES = {
    0: "fp32",
    1: "fp16",
    2: "int4",
    3: "int4",
    7: "int8",
}  # general.file_type: F32, F16, Q4_0, Q4_1, Q8_0


class Decoder:
    label: str  # what runs, for the table
    precision: str  # fp32, int8, int4: how its weights are stored
    weights_bytes: int  # weights a decode step reads (embedding lookups excluded)

    def prefill(self, ids: list[int]) -> int:
        raise NotImplementedError

    def decode(self, token: int) -> int:
        raise NotImplementedError


class EngineDecoder(Decoder):
    def __init__(self, model_dir: str, threads: int):
        from ..engine import Engine

        engine = Engine(model_dir, threads=threads)
        self.llm, engine.vit = engine.llm, None  # text only: the ViT's memory goes back
        self.label = f"this engine ({engine.backend})"
        self.precision = Manifest.read(Path(model_dir)).source.get("precision", "fp32")
        self.weights_bytes = decoder_weight_bytes(Path(model_dir))

    def prefill(self, ids):
        return int(np.argmax(self.llm.prefill(self.llm.embed(ids), reuse_prefix=False)))

    def decode(self, token):
        return int(np.argmax(self.llm.decode(token)))


class GenaiDecoder(Decoder):
    def __init__(self, model_dir: str, precision: str, threads: int, context: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(model_dir)
        config.clear_providers()
        self.model = og.Model(config)
        self.label, self.precision = f"onnxruntime-genai {og.__version__}", precision
        self.weights_bytes = onnx_weight_bytes(
            Path(model_dir) / "model.onnx", skip=("embed_tokens",)
        )
        self.context, self.generator = context, None

    def prefill(self, ids):
        params = self.og.GeneratorParams(self.model)
        # the cache holds ``context`` tokens; min_length keeps a random model's end-of-text token
        # from ending the run early
        params.set_search_options(max_length=self.context, min_length=self.context, do_sample=False)
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(np.array([ids], np.int32))
        return self._next()

    def decode(self, token):
        return self._next()  # the generator feeds back its own last token, which is ``token``

    def _next(self) -> int:
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])


class LlamaCppDecoder(Decoder):
    def __init__(self, gguf: str, threads: int, context: int):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=gguf,
            n_ctx=context,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.label = f"llama-cpp-python {llama_cpp.__version__}"
        file_type = int(self.llm.metadata.get("general.file_type", -1))
        self.precision = GGUF_FILE_TYPES.get(file_type, f"GGUF file type {file_type}")
        model = self.llm.model
        size, params = llama_cpp.llama_model_size(model), llama_cpp.llama_model_n_params(model)
        embeddings = self.llm.n_vocab() * self.llm.n_embd()  # token_embd: looked up, not read whole
        self.weights_bytes = int(size * (params - embeddings) / params)

    def prefill(self, ids):
        self.llm.reset()  # the next eval overwrites the cache from position 0
        self.llm.eval(ids)
        return self._argmax()

    def decode(self, token):
        self.llm.eval([token])
        return self._argmax()

    def _argmax(self) -> int:  # the last row's logits, straight from llama.cpp's buffer
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))


class TransformersDecoder(Decoder):
    """transformers' Qwen2 on the checkpoint's language model (``export_qwen2``), fp32, eager
    attention."""

    def __init__(self, qwen2_dir: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            qwen2_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.label, self.precision = f"torch {torch.__version__}, eager", "fp32"
        self.weights_bytes = sum(
            p.numel() * 4 for n, p in self.model.named_parameters() if "embed_tokens" not in n
        )
        self.cache = None

    def prefill(self, ids):
        self.cache = None
        return self._run(ids)

    def decode(self, token):
        return self._run([token])

    def _run(self, ids) -> int:
        with self.torch.no_grad():
            out = self.model(
                input_ids=self.torch.tensor([ids]),
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache = out.cache
        return int(out.logits[0, -1].argmax())


def onnx_weight_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of a graph's initializers (external data included), less rotary tables and ``skip``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if any(s in t.name for s in skip + ("cos", "sin")):
            continue
        length = next((int(e.value) for e in t.external_data if e.key == "length"), None)
        total += (
            length
            if length is not None
            else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        )
    return total


def decoder_weight_bytes(model_dir: Path) -> int:
    """What a decode step of an engine model directory reads: its decoder graph(s) and post
    model."""
    layout = ModelLayout.find(model_dir)
    graphs = [layout.decoder] if layout.decoder else [*layout.layer_files(), layout.post]
    return sum(onnx_weight_bytes(path) for path in graphs if path.suffix == ".onnx")


def export_qwen2(hf_model: Path, out: Path) -> Path:
    """The checkpoint's language model as a transformers Qwen2 directory (fp32 safetensors, config,
    tokenizer files): what onnxruntime-genai's builder and llama.cpp's converter read."""
    from safetensors.numpy import save_file

    from .export import Checkpoint

    out.mkdir(parents=True, exist_ok=True)
    if (out / "model.safetensors").is_file():
        return out
    config = json.loads((hf_model / "config.json").read_text())["llm_config"]
    (out / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}, indent=1))
    ck = Checkpoint(hf_model)
    prefix = qwen2.PREFIX
    save_file(
        {k[len(prefix) :]: ck.get(k) for k in ck.keys() if k.startswith(prefix)},
        str(out / "model.safetensors"),
    )
    for name in (
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (hf_model / name).is_file():
            (out / name).write_bytes((hf_model / name).read_bytes())
    return out


def build_genai(hf_model: Path, precision: str, work: Path, threads: int) -> Path:
    """onnxruntime-genai's model of the checkpoint's decoder at ``precision`` (fp32/int8/int4),
    built once into ``work`` with its builder's CPU defaults; its sessions get ``threads``
    threads."""
    out = work / f"onnxruntime-genai-{precision}"
    if not (out / "genai_config.json").is_file():
        qwen2 = export_qwen2(hf_model, work / "qwen2")
        log = work / f"onnxruntime-genai-{precision}.log"
        with open(log, "w") as f:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-m",
                    str(qwen2),
                    "-i",
                    str(qwen2),
                    "-o",
                    str(out),
                    "-p",
                    precision,
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "cache"),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        if run.returncode:
            raise InternVLError(f"onnxruntime-genai's builder failed ({log})")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=4))
    return out
