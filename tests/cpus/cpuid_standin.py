"""Building the CPUID stand-in (cpuid_mask.c) and the environment of a process that runs on it: an
x86 CPU without the instruction sets a profile names (AVX2 without VNNI; AVX-512 without VNNI), so
that a VNNI or AMX machine checks what onnxruntime's kernels do on the CPUs it lacks."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROFILES = ("avx2", "avx512")
EXIT_CANNOT_MASK = 97  # cpuid_mask.c exits so before main where it cannot mask


def unavailable() -> str | None:
    """Why the stand-in cannot run here, or None."""
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        return (
            f"the CPUID stand-in is for x86-64 Linux, this is {platform.machine()} {sys.platform}"
        )
    if shutil.which("gcc") is None:
        return "no gcc to build the CPUID stand-in (tests/cpus/cpuid_mask.c)"
    return None


def build(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    library = out / "cpuid_mask.so"
    if not library.is_file():
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-Wall",
                "-Werror",
                "-shared",
                "-fPIC",
                "-o",
                str(library),
                str(HERE / "cpuid_mask.c"),
                "-ldl",
            ],
            check=True,
        )
    return library


def environment(library: Path, profile: str, base: dict | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library), env.get("LD_PRELOAD")]))
    env["CPUID_PROFILE"] = profile
    return env


def masks(library: Path) -> str | None:
    """Why this machine cannot stand in for another CPU (no CPUID faulting), or None."""
    run = subprocess.run(
        ["true"], env=environment(library, PROFILES[0]), capture_output=True, text=True
    )
    if run.returncode == EXIT_CANNOT_MASK:
        return run.stderr.strip()
    return None
