"""internvl-export-native: transformers' native InternVL directory loads in transformers with the
reference's weights, and its chat template, expanded as InternVLProcessor expands it, gives the
engine's prompt token ids, so a server fed the directory (vLLM) sees the engine's prompt."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_torch
from test_toy import RED_CIRCLE

from internvl_engine import Engine, Request
from internvl_engine.prompt import IMG_CONTEXT, IMG_END, IMG_START


@pytest.fixture(scope="module")
def native(tiny_hf, tmp_path_factory):
    needs_torch()
    from internvl_engine.tools.native import export_native

    return export_native(tiny_hf, tmp_path_factory.mktemp("native"))


def test_the_weights_load_as_transformers_internvl(native, tiny_hf):
    import torch
    from transformers import InternVLForConditionalGeneration

    from internvl_engine.prompt import Tokenizer
    from internvl_engine.tools.reference import load_reference

    model = InternVLForConditionalGeneration.from_pretrained(native).eval()
    reference = load_reference(tiny_hf, Tokenizer(tiny_hf).ids[IMG_CONTEXT])
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():  # the same weights; sdpa against eager attention: rounding apart
        got, expected = model(input_ids=ids).logits, reference(input_ids=ids).logits
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("images, system", [(0, None), (1, None), (3, "Be brief.")])
def test_the_chat_template_writes_the_engines_prompt(native, tiny_model, images, system):
    from transformers import AutoTokenizer, InternVLConfig

    tokenizer = AutoTokenizer.from_pretrained(native)
    tokens_per_image = InternVLConfig.from_pretrained(native).image_seq_length
    question = "What is <img> here?"  # markup in a question stays text, as in the engine
    messages = [{"role": "system", "content": system}] if system else []
    parts = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": parts})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # InternVLProcessor's expansion of each image token (one tile per image)
    expanded = text.replace(IMG_CONTEXT, IMG_START + IMG_CONTEXT * tokens_per_image + IMG_END)
    engine = Engine(tiny_model)
    prompt = engine.prepare(Request(question, images=[RED_CIRCLE] * images, system_prompt=system))
    pieces = expanded.split(question)
    assert len(pieces) == 2  # the question as text, encoded apart as the engine does
    ids = (
        tokenizer.encode(pieces[0], add_special_tokens=False)
        + tokenizer.encode(question, add_special_tokens=False, split_special_tokens=True)
        + tokenizer.encode(pieces[1], add_special_tokens=False)
    )
    assert ids == prompt.token_ids
