"""Tokenizer and the InternVL2.5 chat prompt.

Content layout follows InternVL's own chat code: images come before the question, one
``<image>`` placeholder per image (``Image-1: <image>`` when several), video frames as
``Frame1: <image>`` ...; each placeholder becomes ``<img>`` + tiles x N ``<IMG_CONTEXT>`` + ``</img>``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import InvalidRequestError, ModelDirError

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def image_placeholder(tiles: int, tokens_per_tile: int) -> str:
    return IMG_START + IMG_CONTEXT * (tiles * tokens_per_tile) + IMG_END


def user_content(question: str, image_tiles: list[int], tokens_per_tile: int, video: bool = False) -> str:
    if video:
        labels = [f"Frame{i + 1}: " for i in range(len(image_tiles))]
    elif len(image_tiles) > 1:
        labels = [f"Image-{i + 1}: " for i in range(len(image_tiles))]
    else:
        labels = [""] * len(image_tiles)
    images = "".join(f"{label}{image_placeholder(n, tokens_per_tile)}\n" for label, n in zip(labels, image_tiles))
    return images + question


def chat_prompt(system_prompt: str, content: str) -> str:
    """The ``internvl2_5`` template (Qwen chat markup), ready for the assistant's reply."""
    system = f"{IM_START}system\n{system_prompt}{IM_END}\n" if system_prompt else ""
    return f"{system}{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"


class Tokenizer:
    """transformers' AutoTokenizer plus the special-token ids the engine needs, looked up by string."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the checkpoint's model_type is unknown to transformers; harmless
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/... for missing or broken files
            raise ModelDirError(f"{model_dir}: cannot load the tokenizer ({str(e).strip().splitlines()[0]})") from None
        self.ids = {s: self._id(s) for s in (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)}
        self.stop_ids = {self.ids[IM_END]} | ({self._id(EOS)} if self._has(EOS) else set())

    def _has(self, token: str) -> bool:
        return token in self._tok.get_vocab()

    def _id(self, token: str) -> int:
        if not self._has(token):
            raise ModelDirError(f"tokenizer lacks the special token {token!r}")
        return int(self._tok.convert_tokens_to_ids(token))

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def encode_prompt(self, prompt: str, expected_image_tokens: int) -> list[int]:
        ids = self.encode(prompt)
        found = sum(1 for i in ids if i == self.ids[IMG_CONTEXT])
        if found != expected_image_tokens:
            raise InvalidRequestError("the question contains image markup tokens (<img>, <IMG_CONTEXT>); remove them")
        return ids


class TextStream:
    """Turns token ids into text chunks that never end inside a UTF-8 character.

    Byte-level BPE tokens can carry part of a character; decoding such a prefix yields U+FFFD.
    Tokens are held until their text no longer ends in U+FFFD; held text is flushed at the end.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        self._pending.append(token_id)
        text = self._tok.decode(self._pending)
        if text.endswith("\ufffd"):
            return ""
        self._pending.clear()
        return text

    def flush(self) -> str:
        text = self._tok.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return text
