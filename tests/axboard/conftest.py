"""Fixtures for the tests that run the engine's axengine backend through a real pyaxengine over the
board stand-in. tests/test_board.py runs this folder once per vendored pyaxengine version, in a
process whose environment (standin.environment) makes ``import axengine`` find that version and
the stand-in's libraries; it is not collected otherwise (tests/conftest.py)."""

from __future__ import annotations

import ctypes
import os

import pulsar2
import pytest

from internvl_engine import Engine

VERSION = os.environ.get("AXSTANDIN_VERSION", "")
# run() returns views of its output buffer before 0.1.3.rc1
RUN_VIEWS = VERSION in (
    "0.1.2rc0",
    "0.1.3rc0",
)


@pytest.fixture(scope="session")
def standin():
    """The stand-in library as loaded in this process (the same handle pyaxengine uses)."""
    import axengine  # noqa: F401  (loads the libraries)

    lib = ctypes.CDLL("libaxstandin.so")
    lib.standin_last_error.restype = ctypes.c_char_p
    return lib


@pytest.fixture(autouse=True)
def no_standin_errors(standin):
    """Every test ends with the stand-in having seen no invalid call (bad flush range, bad
    buffer...)."""
    before = standin.standin_error_count()
    yield
    assert standin.standin_error_count() == before, standin.standin_last_error().decode()


@pytest.fixture(scope="session")
def board_model(contract_model, tmp_path_factory):
    """The contract export compiled by the stand-in's Pulsar2 into a seed-style axmodel
    directory."""
    return pulsar2.compile_contract(contract_model, tmp_path_factory.mktemp("axmodel"))


@pytest.fixture(scope="session")
def cpu_engine(contract_model):
    """The onnxruntime fixed-shape path: what the board must agree with."""
    return Engine(contract_model, backend="onnxruntime")


@pytest.fixture(scope="session")
def board_engine(board_model, tiny_hf):
    return Engine(board_model, tokenizer_dir=tiny_hf)
