"""Building the board stand-in (standin.c) and the environment a process needs to use it with one of
the vendored pyaxengine versions (../shared/vendor/pyaxengine, test-only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENDOR = HERE.parent.parent.parent / "shared" / "vendor" / "pyaxengine"
ENGINE_LIBS = ("libax_engine.so", "libax_sys.so")  # the on-board NPU (AxEngineExecutionProvider)
CARD_LIBS = ("libaxcl_rt.so",)  # the PCIe card (AXCLRTExecutionProvider)
SONAME = "libaxstandin.so"


def versions() -> list[str]:
    """The vendored pyaxengine versions, oldest first; empty in a user's clone (no ../shared)."""
    from packaging.version import Version

    found = (
        [p.name for p in VENDOR.iterdir() if (p / "axengine").is_dir()] if VENDOR.is_dir() else []
    )
    return sorted(found, key=Version)


def build(out: Path, card: bool = True) -> Path:
    """Compile the stand-in for this interpreter into ``out`` and name it as the board's libraries
    (``card``: also as the PCIe card's, so pyaxengine offers both providers)."""
    out.mkdir(parents=True, exist_ok=True)
    library = out / SONAME
    # cross-compiled for this machine (the ARM64 job has no gcc)
    prebuilt = os.environ.get("AXSTANDIN_LIB")
    if prebuilt and not library.is_file():
        shutil.copy(prebuilt, library)
    if not library.is_file():
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-shared",
                "-fPIC",
                "-Wall",
                "-Werror",
                f"-I{sysconfig.get_paths()['include']}",
                f"-Wl,-soname,{SONAME}",
                "-o",
                str(library),
                str(HERE / "standin.c"),
            ],
            check=True,
        )
    for name in ENGINE_LIBS + (CARD_LIBS if card else ()):
        if not (out / name).exists():
            (out / name).symlink_to(SONAME)
    return out


def environment(lib_dir: Path, version: str, base: dict | None = None) -> dict[str, str]:
    """Environment of a process that imports that pyaxengine version over the stand-in. The loader
    reads LD_LIBRARY_PATH at process start, so this must be given to a new process."""
    env = dict(os.environ if base is None else base)
    paths = [str(VENDOR / version), str(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(
        paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(lib_dir)] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    )
    return env
