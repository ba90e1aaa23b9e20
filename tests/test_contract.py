"""The AX650N fixed-shape contract without a board: ``internvl-export --contract axmodel`` writes
one ONNX model per Pulsar2 shape group, and the engine drives them through the same group selection,
padding, masks, dummy K/V and bf16 embedding file as on the NPU. Teacher-forced against the dynamic
path: same tokens, same logits."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from images import noise_image

from internvl_engine import Engine, GenerationConfig, PromptTooLongError, Request
from internvl_engine.config import LayerBuild, ModelLayout
from internvl_engine.engine import forced_logits, greedy_tokens
from internvl_engine.errors import BackendError, ModelDirError
from internvl_engine.llm import load_embeddings
from internvl_engine.tools.export import save_embeddings_bf16

BUILD = LayerBuild()  # the seed's llm_build, as conftest's contract_model is exported
TOL = 1e-4


@pytest.fixture(scope="module")
def contract_engine(contract_model):
    return Engine(contract_model)


def shapes(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = lambda v: [d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return [(v.name, dims(v)) for v in graph.input], [(v.name, dims(v)) for v in graph.output]


def test_groups_have_the_contract_shapes(contract_model, contract_engine, engine):
    t = engine.spec.text
    kv, h = t.kv_dim, t.hidden_size
    files = sorted(contract_model.glob("layer_0_g*.onnx"), key=lambda p: int(p.stem.split("_g")[1]))
    assert len(files) == 1 + 1152 // 128  # decode, no history, history 128 .. 1024
    inputs, outputs = shapes(files[0])
    assert inputs == [
        ("K_cache", [1, 2559, kv]),
        ("V_cache", [1, 2559, kv]),
        ("indices", [1, 1]),
        ("input", [1, 1, h]),
        ("mask", [1, 1, 2560]),
    ]
    assert outputs == [("K", [1, 1, kv]), ("V", [1, 1, kv]), ("output", [1, 1, h])]
    assert shapes(files[1])[0] == [
        ("K_cache", [1, 1, h]),
        ("V_cache", [1, 1, h]),
        ("indices", [1, 128]),
        ("input", [1, 128, h]),
        ("mask", [1, 128, 128]),
    ]
    for j, path in enumerate(files[2:], start=1):
        inputs, outputs = shapes(path)
        assert inputs[0] == ("K_cache", [1, 128 * j, kv]) and inputs[4] == (
            "mask",
            [1, 128, 128 * j + 128],
        )
        assert outputs == [("K", [1, 128, kv]), ("V", [1, 128, kv]), ("output", [1, 128, h])]
    assert shapes(contract_model / "post.onnx")[0] == [("input", [1, 1, h])]
    # The engine reads its limits from the groups, as it does for a seed directory without a
    # manifest.
    assert contract_engine.llm.shapes.build() == BUILD


@pytest.mark.parametrize("n", [127, 128, 129, 256])
def test_same_logits_at_chunk_boundaries(engine, contract_engine, n):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, 500, n).tolist()
    tokens = greedy_tokens(engine.llm, engine.llm.embed(ids), 6)  # on the dynamic path
    dynamic = forced_logits(engine.llm, engine.llm.embed(ids), tokens[:-1])
    fixed = forced_logits(contract_engine.llm, contract_engine.llm.embed(ids), tokens[:-1])
    assert [int(np.argmax(row)) for row in fixed] == tokens
    for step, (a, b) in enumerate(zip(fixed, dynamic)):
        np.testing.assert_allclose(
            a, b, atol=TOL, rtol=0, err_msg=f"step {step}, prompt of {n} tokens"
        )


@pytest.mark.parametrize("count", [1, 4])
def test_same_tokens_with_images(engine, contract_engine, count):
    request = Request(
        "Describe the images.", images=[noise_image(120, 160, seed=i) for i in range(count)]
    )
    answer = engine.answer(request, GenerationConfig(max_new_tokens=8))
    prompt = contract_engine.prepare(request)
    assert prompt.token_ids == answer.prompt_token_ids
    fixed = forced_logits(contract_engine.llm, prompt.embeds, answer.token_ids[:-1])
    dynamic = forced_logits(engine.llm, engine.prepare(request).embeds, answer.token_ids[:-1])
    assert [int(np.argmax(row)) for row in fixed] == answer.token_ids
    np.testing.assert_allclose(np.array(fixed), np.array(dynamic), atol=TOL, rtol=0)
    assert (
        contract_engine.answer(request, GenerationConfig(max_new_tokens=8)).token_ids
        == answer.token_ids
    )


def test_seed_style_cache_gives_the_same_logits_and_moves_far_more(contract_model, contract_engine):
    seed_style = Engine(contract_model, resident_kv="off")
    assert contract_engine.llm.resident and not seed_style.llm.resident
    ids = list(range(3, 203))
    moved = {}
    for name, e in (("resident", contract_engine), ("seed", seed_style)):
        logits = e.llm.prefill(e.llm.embed(ids), reuse_prefix=False)
        before = e.llm.bytes_moved()
        step = e.llm.decode(int(np.argmax(logits)))
        moved[name] = e.llm.bytes_moved() - before
        moved[name + "_logits"] = step
    np.testing.assert_allclose(moved["resident_logits"], moved["seed_logits"], atol=1e-6, rtol=0)
    t = contract_engine.spec.text
    full_cache = t.num_layers * 2 * BUILD.kv_cache_len * t.kv_dim * 4
    assert moved["seed"] > full_cache  # the whole cache goes through run() every token
    # only the new rows, hidden states, positions and mask
    assert moved["resident"] < full_cache / 50


def test_decode_bytes_are_reported(contract_engine):
    answer = contract_engine.answer(Request("Hi"), GenerationConfig(max_new_tokens=4))
    assert answer.timings.decode_bytes_per_token > 0


def test_prompt_of_1153_tokens_is_refused(contract_engine):
    llm = contract_engine.llm
    assert llm.build.max_prompt_tokens == 1152
    llm.prefill(llm.embed([7] * 1152))  # the longest prompt fits
    with pytest.raises(
        PromptTooLongError, match="1153 tokens; this model build accepts at most 1152"
    ):
        llm.prefill(llm.embed([7] * 1153))
    with pytest.raises(PromptTooLongError, match="at most 1152"):
        contract_engine.answer(Request("word " * 1200))


def test_bf16_embedding_file_is_truncated_fp32(tmp_path, contract_model, tiny_model):
    table = np.array([[1.0, 1.00390625 * (1 + 2**-9), -3.14159, 65504.0]], np.float32)
    save_embeddings_bf16(table, tmp_path / "e.bfloat16.bin")
    loaded = np.asarray(load_embeddings(tmp_path / "e.bfloat16.bin", 1, 4), np.float32)
    # upper 16 bits kept, not rounded
    expected = (table.view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(loaded, expected)
    # The tiny checkpoint is bf16, so the .bin of the contract export equals the dynamic export's
    # .npy.
    npy = load_embeddings(
        tiny_model / "embed_tokens.npy", *np.load(tiny_model / "embed_tokens.npy").shape
    )
    binary = load_embeddings(contract_model / "model.embed_tokens.weight.bfloat16.bin", *npy.shape)
    np.testing.assert_array_equal(np.asarray(binary, np.float32), npy)
    with pytest.raises(ModelDirError, match="has shape"):
        load_embeddings(
            contract_model / "model.embed_tokens.weight.bfloat16.bin",
            npy.shape[0] + 1,
            npy.shape[1],
        )


def seed_directory(root, layers: int):
    """A directory laid out like the seed's InternVL2_5-1B-MPO_axmodel (files are placeholders: the
    axmodels cannot run without a board; this checks how the directory is read)."""
    root.mkdir()
    for i in range(layers):
        (root / f"qwen2_p128_l{i}_together.axmodel").write_bytes(b"")
    (root / "qwen2_post.axmodel").write_bytes(b"")
    return root


def test_seed_directory_layout(tmp_path, tiny_hf, engine):
    n = engine.spec.text.num_layers
    seed = seed_directory(tmp_path / "axmodel", n)
    with pytest.raises(ModelDirError, match="give the original checkpoint directory"):
        ModelLayout.find(seed)
    with pytest.raises(ModelDirError, match="no embedding table"):
        ModelLayout.find(seed, tiny_hf)
    (seed / "model.embed_tokens.weight.bfloat16.bin").write_bytes(b"")
    layout = ModelLayout.find(seed, tiny_hf)
    assert layout.build is None and layout.vit is None
    assert [p.name for p in layout.layers] == [
        f"qwen2_p128_l{i}_together.axmodel" for i in range(n)
    ]
    (seed / f"qwen2_p128_l{n}_together.axmodel").write_bytes(b"")
    with pytest.raises(ModelDirError, match="the model has 2"):
        ModelLayout.find(seed, tiny_hf)


def test_seed_command_line_picks_axengine(tmp_path, tiny_hf):
    """The seed's command line works against a seed directory: ``auto`` picks axengine, which says
    clearly that pyaxengine is missing here."""
    seed = seed_directory(tmp_path / "axmodel", 2)
    (seed / "model.embed_tokens.weight.bfloat16.bin").write_bytes(b"")
    with pytest.raises(BackendError, match="needs pyaxengine"):
        Engine(seed, tokenizer_dir=tiny_hf)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "internvl_engine.cli",
            "--hf_model",
            str(tiny_hf),
            "--axmodel_path",
            str(seed),
            "-q",
            "hello",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "needs pyaxengine" in run.stderr, run.stderr


@pytest.mark.parametrize("fixture", ["engine", "layers_engine", "contract_engine"])
def test_prefix_reuse_gives_the_same_logits(request, fixture):
    """A second question about the same image runs only its new tokens and answers as a fresh
    prefill."""
    e = request.getfixturevalue(fixture)
    image = [noise_image(120, 160, seed=3)]
    first = e.prepare(Request("Describe the image.", images=image))
    second = e.prepare(Request("What colour dominates the image?", images=image))
    e.llm.prefill(first.embeds)
    reused = e.llm.prefill(second.embeds)
    shared = e.llm.reused
    fresh = e.llm.prefill(second.embeds, reuse_prefix=False)
    assert e.llm.reused == 0
    # Everything up to the question is shared: system prompt, image tokens, the user-turn markup.
    question_start = len(second.token_ids) - len(
        e.tokenizer.encode("What colour dominates the image?<|im_end|>\n<|im_start|>assistant\n")
    )
    assert question_start - 2 <= shared < len(second.token_ids)
    np.testing.assert_allclose(reused, fresh, atol=TOL, rtol=0)
    other_image = e.prepare(
        Request("What colour dominates the image?", images=[noise_image(120, 160, seed=4)])
    )
    e.llm.prefill(other_image.embeds)
    # new frames: rerun them
    assert e.llm.reused < second.token_ids.index(e.tokenizer.ids["<IMG_CONTEXT>"]) + 1
    answer = e.answer(
        Request("What colour dominates the image?", images=[noise_image(120, 160, seed=4)]),
        GenerationConfig(max_new_tokens=2),
    )
    assert answer.timings.reused_tokens >= question_start - 2
