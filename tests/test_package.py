"""The repository is a ROS 2 package: colcon builds it in place from ros2_ws/, and the runtime
engine imports without ROS or torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ros_tools import WORKSPACE, needs_ros_tools

ROOT = Path(__file__).resolve().parent.parent


def test_colcon_builds_the_package(tmp_path):
    """A plain (copying) colcon build of internvl_ros installs the package, its data and
    executables."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [
            "colcon",
            "--log-base",
            str(tmp_path / "log"),
            "build",
            "--base-paths",
            str(ROOT / "ros2_ws" / "src"),
            "--packages-select",
            "internvl_ros",
            "--build-base",
            str(tmp_path / "build"),
            "--install-base",
            str(tmp_path / "install"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    share = tmp_path / "install" / "internvl_ros" / "share"
    assert (share / "ament_index" / "resource_index" / "packages" / "internvl_ros").is_file()
    pkg = share / "internvl_ros"
    assert (pkg / "package.xml").read_text() == (ROOT / "package.xml").read_text()
    for folder in ("launch", "config"):
        expected = sorted(p.name for p in (ROOT / folder).iterdir() if p.suffix in (".py", ".yaml"))
        assert expected, f"{folder}/ is empty"
        assert sorted(p.name for p in (pkg / folder).iterdir()) == expected
    assert (
        tmp_path / "install" / "internvl_ros" / "lib" / "internvl_ros" / "internvl_node"
    ).is_file()


def test_the_workspace_is_a_symlink_install():
    """make ws builds ros2_ws with --symlink-install, as ROS developers build Python packages: the
    installed launch and config files are the checkout's, and the messages import."""
    needs_ros_tools()
    pkg = WORKSPACE / "internvl_ros" / "share" / "internvl_ros"
    for name in ("launch/internvl.launch.py", "config/internvl.yaml"):
        assert (pkg / name).is_symlink() and (pkg / name).resolve() == (ROOT / name).resolve(), name
    code = (
        "from internvl_msgs.action import Ask; from internvl_msgs.msg import Answer; "
        "print(Answer.BUSY)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "6", proc.stderr


def test_colcon_test_without_torch(tmp_path):
    """On a board there is no torch: colcon test must skip what needs it, not error. torch and
    transformers are hidden from the test run as they are missing there (ModuleNotFoundError)."""
    needs_ros_tools()
    for name in ("torch", "transformers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name}", name="{name}")'
        )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    collect = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collect.returncode == 0 and " collected" in collect.stdout, (
        collect.stdout[-3000:] + collect.stderr
    )
    test = subprocess.run(
        [
            "colcon",
            "--log-base",
            str(tmp_path / "log"),
            "test",
            "--packages-select",
            "internvl_ros",
            "--test-result-base",
            str(tmp_path / "results"),
            "--pytest-args",
            "tests/test_parity.py",
            "tests/test_tokenizer.py",
        ],
        cwd=ROOT / "ros2_ws",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = subprocess.run(
        ["colcon", "test-result", "--test-result-base", str(tmp_path / "results"), "--all"],
        cwd=ROOT / "ros2_ws",
        capture_output=True,
        text=True,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert test.returncode == 0 and "0 errors, 0 failures" in summary, (
        test.stdout[-3000:] + result.stdout
    )
    skipped = int(summary.split(" skipped")[0].rsplit(" ", 1)[1])
    assert skipped >= 10, summary  # every parity test and the transformers comparison


def test_inference_path_never_imports_ros_or_torch(tiny_model):
    """The board has no torch: load the engine, answer about an image, then look at sys.modules."""
    code = (
        "import sys, numpy as np; from internvl_engine import Engine, Request, GenerationConfig; "
        f"e = Engine({str(tiny_model)!r}); "
        "e.answer(Request('?', images=[np.zeros((32, 32, 3), np.uint8)]), "
        "GenerationConfig(max_new_tokens=2)); "
        "bad = [m for m in ('rclpy', 'torch', 'torchvision', 'decord') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_node_module_never_imports_torch():
    code = (
        "import sys, internvl_ros.node, internvl_ros.bags, internvl_ros.client; "
        "sys.exit('torch imported' if 'torch' in sys.modules else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_parameter_file_documents_every_declared_parameter():
    import yaml

    from internvl_ros.params import PARAMETERS

    body = yaml.safe_load((ROOT / "config" / "internvl.yaml").read_text())["/**"]["ros__parameters"]

    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    documented = dict(flatten(body))
    assert documented == {name: p.default for name, p in PARAMETERS.items()}


def test_launch_file_is_valid_python_with_the_documented_arguments():
    import ast

    tree = ast.parse((ROOT / "launch" / "internvl.launch.py").read_text(), "internvl.launch.py")
    declared = {
        call.args[0].value
        for call in ast.walk(tree)
        if isinstance(call, ast.Call)
        and getattr(call.func, "id", None) == "DeclareLaunchArgument"
        and call.args
        and isinstance(call.args[0], ast.Constant)
    }
    documented = {"params_file", "namespace", "backend", "model_dir", "hf_model", "image_topic"}
    assert documented <= declared, documented - declared


def test_readme_lists_every_parameter_with_its_default():
    """README's parameter table names each parameter once, with its default and whether it is set at
    start-up only (*), as internvl_ros/params.py declares it."""
    from internvl_ros.params import DEFAULT_SYSTEM_PROMPT, PARAMETERS

    readme = (ROOT / "README.md").read_text()
    table = (
        readme[readme.index("| parameter | default | what |") :].split("\n\n")[0].splitlines()[2:]
    )

    def shown(value) -> str:
        if value == DEFAULT_SYSTEM_PROMPT:
            return "InternVL2.5's"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list):
            return f"[{', '.join(value)}]"
        return '""' if value == "" else str(value)

    listed = {}
    for row in table:
        names, defaults, _ = (cell.strip() for cell in row.strip("|").split("|"))
        read_only = names.endswith("*")
        for name, default in zip(
            re.findall(r"`([\w.]+)`", names), defaults.split(", "), strict=True
        ):
            listed[name] = (default.strip("`"), read_only)
    assert listed == {name: (shown(p.default), p.read_only) for name, p in PARAMETERS.items()}
