"""The stand-in's "Pulsar2": compiles an ``internvl-export --contract axmodel`` directory into a
directory laid out like the seed's precompiled one (``qwen2_p128_l{i}_together.axmodel``,
``qwen2_post.axmodel``, ``*vit*.axmodel``, ``model.embed_tokens.weight.bfloat16.bin``; config and
tokenizer come from the original checkpoint, ``--hf_model``), in the stand-in's model format.

IO dtypes follow Pulsar2's ``llm_build``: the decoder layers take and give bf16 (positions as
uint32), the post model takes bf16 and gives float32 logits, the ViT takes and gives float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

MAGIC = "AXSTANDIN-MODEL 1\n"
_NAMES = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.UINT32: "u32"}


def _io(values, float_name: str) -> list[tuple[str, str, list[int]]]:
    out = []
    for v in values:
        dtype = _NAMES[v.type.tensor_type.elem_type]
        out.append(
            (
                v.name,
                float_name if dtype == "f32" else dtype,
                [d.dim_value for d in v.type.tensor_type.shape.dim],
            )
        )
    return out


def write_model(path: Path, groups: list[Path], inputs_float: str, outputs_float: str) -> Path:
    """One stand-in .axmodel holding each group's ONNX graph (in group order) and its IO table."""
    header, blob = [MAGIC, f"groups {len(groups)}\n"], b""
    for index, group in enumerate(groups):
        graph_bytes = Path(group).read_bytes()
        graph = onnx.load_from_string(graph_bytes).graph
        if any(
            d.dim_value == 0
            for v in (*graph.input, *graph.output)
            for d in v.type.tensor_type.shape.dim
        ):
            raise ValueError(f"{group}: Pulsar2 compiles fixed shapes only")
        header.append(f"group {index} {len(blob)} {len(graph_bytes)}\n")
        for kind, values, float_name in (
            ("in", graph.input, inputs_float),
            ("out", graph.output, outputs_float),
        ):
            for name, dtype, shape in _io(values, float_name):
                header.append(f"{kind} {name} {dtype} {len(shape)} {' '.join(map(str, shape))}\n")
        blob += graph_bytes
    header.append("end\n")
    Path(path).write_bytes("".join(header).encode() + blob)
    return Path(path)


def compile_contract(contract_dir: Path, out_dir: Path) -> Path:
    """A seed-style axmodel directory from a ``--contract axmodel`` export."""
    contract_dir, out_dir = Path(contract_dir), Path(out_dir)
    manifest = json.loads((contract_dir / "manifest.json").read_text())
    if manifest["source"].get("contract") != "axmodel":
        raise ValueError(f"{contract_dir} is not an --contract axmodel export")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, groups in enumerate(manifest["files"]["layers"]):
        write_model(
            out_dir / f"qwen2_p128_l{i}_together.axmodel",
            [contract_dir / g for g in groups],
            "bf16",
            "bf16",
        )
    write_model(
        out_dir / "qwen2_post.axmodel", [contract_dir / manifest["files"]["post"]], "bf16", "f32"
    )
    write_model(
        out_dir / "internvl_vit.axmodel", [contract_dir / manifest["files"]["vit"]], "f32", "f32"
    )
    shutil.copy2(
        contract_dir / manifest["files"]["embeddings"], out_dir / manifest["files"]["embeddings"]
    )
    return out_dir
