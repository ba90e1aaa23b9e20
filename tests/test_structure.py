"""How the code is laid out, where it matters to a user or the next feature: the runtime imports no
tool and has no import cycle, a model family's layer is written once and its checkpoint names live
in its own file, the node is a thin shell, and every console script's --help works without the ROS
workspace sourced."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "internvl_engine"
BIN = Path(sys.executable).parent


def runtime_modules() -> list[str]:
    return sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in ENGINE.rglob("*.py")
        if "tools" not in p.relative_to(ENGINE).parts
    )


def test_the_runtime_imports_no_tool():
    """What a board imports: the whole runtime, and not one of the tools (exporter, doctor,
    bench...)."""
    code = (
        "import importlib, sys\n"
        f"for name in {runtime_modules()!r}:\n"
        "    if name != 'internvl_engine.backend_axengine':  # pyaxengine: the board's\n"
        "        importlib.import_module(name)\n"
        "print([m for m in sys.modules if m.startswith('internvl_engine.tools')])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def imports_of(path: Path) -> set[str]:
    """The internvl_engine modules a file imports anywhere in it (inside functions too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("internvl_engine"):
                found.add(base)
                found.update(
                    f"{base}.{a.name}"
                    for a in node.names
                    if (ROOT / base.replace(".", "/") / f"{a.name}.py").is_file()
                )
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("internvl_engine"))
    return found


def test_the_runtime_import_graph_has_no_cycle_and_no_tool():
    modules = runtime_modules()
    graph = {}
    for name in modules:
        path = ROOT / (name.replace(".", "/") + ".py")
        path = path if path.is_file() else ROOT / name.replace(".", "/") / "__init__.py"
        graph[name] = {m for m in imports_of(path) if m != name}
    assert not {m for edges in graph.values() for m in edges if ".tools" in m}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name) :] + [name]))
        if name in done or name not in graph:
            return
        path.append(name)
        # the package itself only re-exports, lazily
        for other in sorted(graph[name] - {"internvl_engine"}):
            visit(other)
        path.pop()
        done.add(name)

    for name in modules:
        visit(name)


def test_each_layout_of_the_decoder_is_built_from_the_one_qwen2_layer(
    tiny_hf, tmp_path, monkeypatch
):
    from internvl_engine.config import LayerBuild
    from internvl_engine.models import qwen2
    from internvl_engine.tools.export import export

    calls = []
    layer = qwen2.layer
    monkeypatch.setattr(
        qwen2, "layer", lambda ops, *args: calls.append(type(ops).__name__) or layer(ops, *args)
    )
    for contract in ("fused", "dynamic"):
        export(
            tiny_hf, tmp_path / contract, LayerBuild(16, 255, 128), contract, log=lambda *_: None
        )
    assert calls == ["FusedDecoder"] * 2 + ["ContractLayer"] * 2  # the tiny model has 2 layers


# Fragments of the checkpoints' tensor names (the original layout and transformers'), which only the
# model family files may spell out.
KEY_FRAGMENTS = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.",
    "mlp.gate_proj",
    "mlp.down_proj",
    "attn.qkv",
    "attn.proj",
    "mlp.fc1",
    "norm1.",
    "class_embedding",
    "embeddings.position",
    "mlp1.0",
    "mlp1.1",
    "mlp1.3",
    "vision_tower.encoder",
    "multi_modal_projector.linear",
    "lm_head.weight",
    'model.embed_tokens.weight"',
)


def test_checkpoint_names_live_in_the_model_family_files():
    spelled = {}
    for path in [*ROOT.glob("internvl_*/**/*.py"), *ROOT.glob("scripts/*.py")]:
        if "models" in path.relative_to(ROOT).parts:
            continue
        text = path.read_text()
        if found := [f for f in KEY_FRAGMENTS if f in text]:
            spelled[str(path.relative_to(ROOT))] = found
    assert spelled == {}


def test_the_node_is_a_thin_shell():
    assert len((ROOT / "internvl_ros" / "node.py").read_text().splitlines()) <= 300


def without_the_workspace() -> dict[str, str]:
    """This environment with the ROS workspace (ros2_ws/install) unsourced."""
    env = dict(os.environ)
    for name in (
        "PYTHONPATH",
        "AMENT_PREFIX_PATH",
        "CMAKE_PREFIX_PATH",
        "LD_LIBRARY_PATH",
        "COLCON_PREFIX_PATH",
    ):
        kept = [p for p in env.get(name, "").split(os.pathsep) if p and "ros2_ws" not in p]
        if kept:
            env[name] = os.pathsep.join(kept)
        else:
            env.pop(name, None)
    return env


SCRIPTS = re.findall(r'"([\w-]+) = [\w.]+:\w+"', (ROOT / "setup.py").read_text())


@pytest.mark.parametrize("script", ["internvl_node", "internvl-ask"])
def test_the_ros_console_scripts_help_without_the_workspace(script):
    run = subprocess.run(
        [str(BIN / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=without_the_workspace(),
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.startswith("usage: "), run.stdout
    assert script in SCRIPTS
