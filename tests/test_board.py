"""The AX650N path through the real pyaxengine, off-board: tests/axboard runs once per vendored
pyaxengine version (../shared/vendor/pyaxengine), each in its own process over the board stand-in
(tests/axboard/standin.c), because pyaxengine picks its providers and libraries at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "axboard"))
import standin  # noqa: E402

VERSIONS = standin.versions()


@pytest.fixture(scope="session")
def standin_libs(tmp_path_factory) -> Path:
    return standin.build(tmp_path_factory.mktemp("axstandin"))


@pytest.mark.skipif(
    not VERSIONS,
    reason=f"no vendored pyaxengine at {standin.VENDOR} (a user's clone has no "
    "../shared): the board stand-in tests need its sources",
)
@pytest.mark.parametrize("version", VERSIONS or ["none"])
def test_axengine_path_over_the_board_stand_in(standin_libs, version, tmp_path, request):
    env = standin.environment(standin_libs, version)
    env["AXSTANDIN_VERSION"] = version
    select = request.config.getoption("--board-select")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-s",
            "--basetemp",
            str(tmp_path / "t"),
            *(["-k", select] if select else []),
            str(Path(__file__).parent / "axboard"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(run.stdout[-6000:])
    assert run.returncode == 0, (
        f"pyaxengine {version}:\n{run.stdout[-12000:]}\n{run.stderr[-4000:]}"
    )
    assert " passed" in run.stdout, run.stdout[-2000:]
