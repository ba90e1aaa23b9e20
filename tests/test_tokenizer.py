"""The engine's tokenizer (built with ``tokenizers``, no transformers import) tokenizes and decodes
exactly as transformers' AutoTokenizer does for the same checkpoint files."""

from __future__ import annotations

import json

import pytest
from conftest import needs_torch

from internvl_engine import ModelDirError
from internvl_engine.config import DEFAULT_SYSTEM_PROMPT
from internvl_engine.prompt import Tokenizer, chat_prompt, user_content

TEXTS = [
    "What is in front of me?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "Numbers 1234567 and 3.14, mixed-case WORDS, don't it's we'll I'm they've",
    "机器人看到了一个红色的圆。请描述这幅图像。",
    "emoji 😀🤖 and accents: café naïve",
    "ﬁ ligature and Ａ full width",
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nHi<|im_end|>",
    "<|endoftext|>x<|endoftext|>",
    chat_prompt(DEFAULT_SYSTEM_PROMPT, user_content("Which way?", [1, 1], 4, video=True)),
]


def test_tokenizer_matches_transformers(tiny_hf):
    needs_torch()
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer(tiny_hf), AutoTokenizer.from_pretrained(str(tiny_hf))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    for token in (
        "<|im_start|>",
        "<|im_end|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<|endoftext|>",
    ):
        assert ours._id(token) == theirs.convert_tokens_to_ids(token)


def test_tokenizer_errors(tiny_hf, tmp_path):
    with pytest.raises(ModelDirError, match="no tokenizer"):
        Tokenizer(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_hf / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    context = next(k for k, v in decoder.items() if v["content"] == "<IMG_CONTEXT>")
    decoder[context] = {**decoder[context], "content": "<SOMETHING_ELSE>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="lacks the special token '<IMG_CONTEXT>'"):
        Tokenizer(tmp_path)
    del decoder[context]  # a gap in the added-token ids
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="ids must follow the vocabulary"):
        Tokenizer(tmp_path)
    (tmp_path / "merges.txt").write_text("not a merges file\x00")
    with pytest.raises(ModelDirError, match="cannot load the tokenizer"):
        Tokenizer(tmp_path)
