"""The same answers on every CPU: the engine asks the CPU whether onnxruntime's int8 GEMM is exact
here (internvl_engine.cpu) and changes the int8 graphs where it is not; the quantised exports' tests
run again on x86 CPUs this machine stands in for (tests/cpus: AVX2 without VNNI, AVX-512 without
VNNI), with their real kernels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from internvl_engine.backend_onnxruntime import load_session, session_options
from internvl_engine.cpu import cpu_info, int8_gemm_exact, int8_path

sys.path.insert(0, str(Path(__file__).parent / "cpus"))
import cpuid_standin as standin  # noqa: E402

ZEN3_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse "
    "sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm rep_good nopl cpuid extd_apicid pni pclmulqdq "
    "ssse3 fma "
    "cx16 sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm "
    "cmp_legacy abm "
    "sse4a fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni "
    "xsaveopt vaes "
    "vpclmulqdq rdpid fsrm"
)
A76_FEATURES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop "
    "asimddp"
)


@pytest.mark.parametrize(
    "machine, text, described",
    [
        (
            "x86_64",
            "processor\t: 0\nmodel name\t: AMD EPYC 7543 32-Core Processor\nflags\t\t: "
            f"{ZEN3_FLAGS}\n\n"
            "processor\t: 1\nflags\t\t: avx512f\n",
            "AMD EPYC 7543 32-Core Processor (x86_64): AVX2, FMA",
        ),
        (
            "x86_64",
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 fma "
            "avx512f "
            "avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n",
            "Intel(R) Xeon(R) Platinum 8480+ (x86_64): AVX2, FMA, AVX-512, AVX-512 VNNI, AVX-VNNI, "
            "AVX-512 BF16, AMX-INT8",
        ),
        (
            "aarch64",
            f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {A76_FEATURES}\nCPU part\t: 0xd0b\n",
            "aarch64: NEON, dot product",
        ),
        ("aarch64", "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n", "aarch64: NEON"),
        (
            "x86_64",
            "processor\t: 0\nflags\t\t: sse sse2\n",
            "x86_64: none of AVX2, FMA, AVX-512, AVX-512 VNNI, AVX-VNNI, AVX-512 BF16, AMX-INT8",
        ),
    ],
)
def test_cpu_info_names_the_instruction_sets_that_matter(
    machine, text, described, tmp_path, monkeypatch
):
    (tmp_path / "cpuinfo").write_text(text)
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert cpu_info(tmp_path / "cpuinfo").describe() == described


def linear_int8_model(weights: np.ndarray) -> bytes:
    """uint8 rows (zero point 128) times int8 ``weights``, as the int8 graphs multiply."""
    node = helper.make_node(
        "MatMulIntegerToFloat", ["a", "b", "one", "one", "zero"], ["y"], domain="com.microsoft"
    )
    graph = helper.make_graph(
        [node],
        "linear",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["rows", weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weights.shape[1]])],
        [
            numpy_helper.from_array(weights, "b"),
            numpy_helper.from_array(np.float32(1), "one"),
            numpy_helper.from_array(np.uint8(128), "zero"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model.SerializeToString()


def test_the_probe_says_what_the_kernel_does_and_the_engine_is_exact_either_way(tmp_path):
    """Rows of large values times weights of one sign make every int16 pair sum of a saturating
    kernel overflow. Taken as it is, the model is exact where the probe says so and wrong where it
    does not; through the engine's loader it is exact on every CPU."""
    rng = np.random.default_rng(7)
    rows = rng.integers(230, 256, (96, 256), dtype=np.uint8)
    weights = rng.integers(100, 128, (256, 48), dtype=np.int8) * rng.choice(
        np.array([-1, 1], np.int8), (1, 48)
    )
    expected = ((rows.astype(np.int64) - 128) @ weights.astype(np.int64)).astype(np.float32)
    (tmp_path / "linear.onnx").write_bytes(linear_int8_model(weights))
    as_is = ort.InferenceSession(str(tmp_path / "linear.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(as_is.run(None, {"a": rows})[0], expected) == int8_gemm_exact()
    session, changes = load_session(tmp_path / "linear.onnx", session_options(1))
    np.testing.assert_array_equal(session.run(None, {"a": rows})[0], expected)
    assert changes == ([] if int8_gemm_exact() else ["int8 weights read as uint8 (u8 x u8)"])
    assert int8_path().startswith(
        "int8 GEMM u8 x s8, exact here" if int8_gemm_exact() else "int8 GEMM u8 x s8 saturates"
    )


def test_the_doctor_names_the_cpu_and_how_the_int8_graphs_run_on_it(tiny_hf, tmp_path):
    from conftest import TINY_BUILD_ARGS

    from internvl_engine.config import LayerBuild
    from internvl_engine.tools.export import export

    export(
        tiny_hf,
        tmp_path / "int8",
        LayerBuild(**TINY_BUILD_ARGS),
        precision="int8",
        log=lambda *_: None,
    )
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "internvl-doctor"),
            "--model-dir",
            str(tmp_path / "int8"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"ok       CPU {cpu_info().describe()}; {int8_path()}\n" in run.stdout
    changed = (
        "ok       for this CPU's int8 GEMM: vit.onnx: int8 weights read as uint8 (u8 x u8); "
        "prompt_decoder.onnx: "
        "int8 weights read as uint8 (u8 x u8)\n"
    )
    assert (changed in run.stdout) != int8_gemm_exact(), run.stdout


# The engine's int8 path, end to end: exports, the prompt graph, fidelity, the toy's answers.
STAND_IN_TESTS = [
    "tests/test_quantized.py",
    "tests/test_cpus.py",
    "tests/test_toy.py::test_quantized_exports_answer_as_fp32_does",
]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    if why := standin.unavailable():
        pytest.skip(why)
    library = standin.build(tmp_path_factory.mktemp("cpuid"))
    if why := standin.masks(library):
        pytest.skip(f"cannot stand in for other x86 CPUs here: {why}")
    return library


@pytest.mark.parametrize("profile", standin.PROFILES)
def test_int8_exports_on_a_cpu_without_vnni(stand_in, profile, tmp_path):
    """This machine's CPUID says AVX2 (or AVX-512) without VNNI, so onnxruntime picks the kernels
    such a CPU runs (its u8 x s8 GEMM saturating), and the engine's int8 tests pass there too."""
    env = standin.environment(stand_in, profile)
    probe = subprocess.run(
        [sys.executable, "-c", "from internvl_engine.cpu import int8_path; print(int8_path())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0 and probe.stdout.startswith("int8 GEMM u8 x s8 saturates here"), (
        probe.stdout + probe.stderr
    )
    root = Path(__file__).parent.parent
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "t"),
            "-k",
            "not on_a_cpu_without_vnni",
            *STAND_IN_TESTS,
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, (
        f"CPUID_PROFILE={profile}:\n{run.stdout[-12000:]}\n{run.stderr[-4000:]}"
    )
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
