"""Helpers of the ARM64 job (scripts/test_arm64.sh), run on the x86-64 host.

``cpuinfo CPU COUNT``: an Arm /proc/cpuinfo for a qemu core, to bind-mount over the host's x86 one
(onnxruntime's cpuinfo library reads it to pick kernels: it must match the emulated core). ``venv
ROOT CHECKOUT``: make the root's venv (/opt/venv) run the checkout (at CHECKOUT inside the root) as
it is: a .pth file naming it, and the console scripts setup.py declares.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# qemu 7.2's Arm cores: (implementer, part, the features Linux lists for them).
BASE = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
CORES = {
    "cortex-a53": ("0x41", "0xd03", BASE),
    "cortex-a72": ("0x41", "0xd08", BASE),
    "cortex-a76": ("0x41", "0xd0b", BASE + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp"),
    "neoverse-n1": (
        "0x41",
        "0xd0c",
        BASE + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp ssbs",
    ),
}


def cpuinfo(core: str, count: int) -> str:
    if core not in CORES:
        raise SystemExit(
            f"arm64_root.py: no /proc/cpuinfo for QEMU_CPU={core} (choose from {', '.join(CORES)})"
        )
    implementer, part, features = CORES[core]
    return "".join(
        f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: "
        f"{implementer}\n"
        f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part}\nCPU revision\t: 0\n\n"
        for i in range(count)
    )


VENV = "opt/venv"
SITE = f"{VENV}/lib/python3.11/site-packages"


def venv(root: Path, checkout: str) -> None:
    site, bin_dir = root / SITE, root / VENV / "bin"
    # each package is the folder of its name
    (site / "internvl_checkout.pth").write_text(checkout + "\n")
    for name, module, function in re.findall(
        r'"([\w-]+) = ([\w.]+):(\w+)"', (REPO / "setup.py").read_text()
    ):
        script = bin_dir / name
        script.write_text(
            f"#!/{VENV}/bin/python\nimport sys\nfrom {module} import {function}\n"
            f"sys.exit({function}())\n"
        )
        script.chmod(0o755)


if __name__ == "__main__":
    if sys.argv[1:2] == ["cpuinfo"]:
        print(cpuinfo(sys.argv[2], int(sys.argv[3])), end="")
    elif sys.argv[1:2] == ["venv"]:
        venv(Path(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit("usage: arm64_root.py cpuinfo CPU COUNT | venv ROOT CHECKOUT")
