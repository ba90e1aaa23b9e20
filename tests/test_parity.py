"""The engine against transformers' own InternVL on the same tiny checkpoint, teacher-forced:
every engine token is the reference's argmax (within 1e-3 logit) and the engine's post-model
logits at every step agree with the reference's to 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_CHUNK
from images import noise_image

from internvl_engine import GenerationConfig, Request
from internvl_engine.engine import forced_logits

TOL = 1e-3
NEW_TOKENS = 6


@pytest.fixture(params=["engine", "layers_engine"])
def cpu_engine(request):
    """Both CPU layouts: the fused decoder graph and the per-layer models."""
    return request.getfixturevalue(request.param)


def assert_matches_reference(engine, reference, request: Request):
    # torch: imported once a test has its reference
    from internvl_engine.tools.reference import (
        reference_logits,
    )

    answer = engine.answer(request, GenerationConfig(max_new_tokens=NEW_TOKENS))
    prompt = engine.prepare(request)
    assert prompt.token_ids == answer.prompt_token_ids
    ids = answer.prompt_token_ids + answer.token_ids
    ref = reference_logits(reference, ids, prompt.pixel_values)
    n = len(answer.prompt_token_ids)
    # Tokens: each generated token is the reference's argmax at that position (ties within TOL).
    for step, token in enumerate(answer.token_ids):
        row = ref[n - 1 + step]
        assert row[token] >= row.max() - TOL, (
            f"step {step}: token {token} is not the reference argmax"
        )
    # Logits: the engine's own prefill and decode steps, fed the same tokens.
    logits = forced_logits(engine.llm, prompt.embeds, answer.token_ids[:-1])
    for step, row in enumerate(logits):
        np.testing.assert_allclose(
            row, ref[n - 1 + step], atol=TOL, rtol=0, err_msg=f"logits at step {step}"
        )
    return answer


def test_text_only(cpu_engine, reference):
    answer = assert_matches_reference(cpu_engine, reference, Request("What is in front of me?"))
    assert answer.timings.vit_ms == []
    assert cpu_engine.tokenizer.ids["<img>"] not in answer.prompt_token_ids


def test_one_image_with_tiling(cpu_engine, reference):
    request = Request("Describe the image.", images=[noise_image(300, 500)], max_tiles=6)
    answer = assert_matches_reference(cpu_engine, reference, request)
    assert len(answer.timings.vit_ms) == 1


def test_four_images(cpu_engine, reference):
    images = [noise_image(120 + 40 * i, 160, seed=i) for i in range(4)]
    answer = assert_matches_reference(
        cpu_engine, reference, Request("Which image is brightest?", images=images)
    )
    assert len(answer.timings.vit_ms) == 4


def test_eight_frame_video(cpu_engine, reference):
    frames = [noise_image(96, 128, seed=10 + i) for i in range(8)]
    answer = assert_matches_reference(
        cpu_engine, reference, Request("What happens?", video_frames=frames)
    )
    assert len(answer.timings.vit_ms) == 8


def shortest_prompt(engine) -> int:
    return len(engine.prepare(Request("~")).token_ids)


def question_with_prompt_length(engine, target: int) -> str:
    """A text question whose prompt is exactly ``target`` tokens ('~' is one token each here)."""
    question = "~" * (target - shortest_prompt(engine) + 1)
    assert len(engine.prepare(Request(question)).token_ids) == target
    return question


@pytest.mark.parametrize("extra_chunks", [0, 1, 4])
def test_prompt_of_exact_chunk_multiple(cpu_engine, reference, extra_chunks):
    """len % chunk == 0: the seed runner ran an empty chunk and read a padding row here."""
    target = (-(-shortest_prompt(cpu_engine) // TEST_CHUNK) + extra_chunks) * TEST_CHUNK
    answer = assert_matches_reference(
        cpu_engine, reference, Request(question_with_prompt_length(cpu_engine, target))
    )
    assert answer.timings.prefill_tokens == target


def test_prompt_spanning_several_chunks(cpu_engine, reference):
    target = shortest_prompt(cpu_engine) + 3 * TEST_CHUNK + 5
    answer = assert_matches_reference(
        cpu_engine, reference, Request(question_with_prompt_length(cpu_engine, target))
    )
    assert answer.timings.prefill_tokens == target


def test_vit_features_equal_reference(cpu_engine, reference):
    from internvl_engine.tools.reference import reference_image_features

    prompt = cpu_engine.prepare(Request("?", images=[noise_image(112, 112, seed=3)]))
    features = cpu_engine.vit.run({"image": prompt.pixel_values})[0]
    np.testing.assert_allclose(
        features, reference_image_features(reference, prompt.pixel_values), atol=1e-4
    )
