"""Tokenizer and the InternVL2.5 chat prompt.

Content layout follows InternVL's own chat code: images come before the question, one ``<image>``
placeholder per image (``Image-1: <image>`` when several), video frames as ``Frame1: <image>`` ...;
each placeholder becomes ``<img>`` + tiles x N ``<IMG_CONTEXT>`` + ``</img>``.

The question and the system prompt are text: chat or image markup typed in them (``<|im_end|>``,
``<img>``) is encoded as the characters it is, never as the special tokens the template uses, so
whoever can ask a question cannot end the user turn or rewrite the system prompt (transformers calls
this splitting special tokens), and a system prompt (a node parameter anyone on the ROS graph can
set) cannot open a turn or hold an image slot that no image fills.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelDirError
from .grounding import GROUNDING_QUESTION, GROUNDING_TOKENS, REF_END, REF_START

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END, EOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def image_placeholder(tiles: int, tokens_per_tile: int) -> str:
    return IMG_START + IMG_CONTEXT * (tiles * tokens_per_tile) + IMG_END


def image_lines(image_tiles: list[int], tokens_per_tile: int, video: bool = False) -> str:
    """One line per image (tiles per image) or video frame, placeholders expanded."""
    if video:
        labels = [f"Frame{i + 1}: " for i in range(len(image_tiles))]
    elif len(image_tiles) > 1:
        labels = [f"Image-{i + 1}: " for i in range(len(image_tiles))]
    else:
        labels = [""] * len(image_tiles)
    return "".join(
        f"{label}{image_placeholder(n, tokens_per_tile)}\n" for label, n in zip(labels, image_tiles)
    )


def user_content(
    question: str, image_tiles: list[int], tokens_per_tile: int, video: bool = False
) -> str:
    return image_lines(image_tiles, tokens_per_tile, video) + question


# The ``internvl2_5`` template (Qwen chat markup): what goes around the system prompt (no turn when
# it is empty), and around the user's content, ready for the assistant's reply.
SYSTEM_TURN = (f"{IM_START}system\n", f"{IM_END}\n")
USER_TURN = (f"{IM_START}user\n", f"{IM_END}\n{IM_START}assistant\n")


def chat_prompt(system_prompt: str, content: str) -> str:
    return (system_prompt.join(SYSTEM_TURN) if system_prompt else "") + content.join(USER_TURN)


# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer uses the same expression).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def load_qwen2_tokenizer(model_dir: Path):
    """The Qwen2 byte-level BPE tokenizer of a checkpoint, built with ``tokenizers`` exactly as
    transformers' Qwen2Tokenizer builds it (tests compare the two), because importing transformers
    imports torch wherever torch is installed and the inference path must not."""
    from tokenizers import (
        AddedToken,
        Regex,
        decoders,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers import (
        Tokenizer as RustTokenizer,
    )
    from tokenizers.models import BPE

    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file():
        return RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab, merges = model_dir / "vocab.json", model_dir / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise ModelDirError(
            f"{model_dir}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
        )
    tok = RustTokenizer(
        BPE.from_file(
            str(vocab),
            str(merges),
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added tokens with their ids: tokenizer_config.json's added_tokens_decoder, else
    # added_tokens.json.
    config = model_dir / "tokenizer_config.json"
    decoder = (
        json.loads(config.read_text()).get("added_tokens_decoder", {}) if config.is_file() else {}
    )
    if decoder:
        added = {int(i): t for i, t in decoder.items()}
    elif (model_dir / "added_tokens.json").is_file():
        added = {
            i: {"content": t, "special": True}
            for t, i in json.loads((model_dir / "added_tokens.json").read_text()).items()
        }
    else:
        added = {}
    for token_id, t in sorted(added.items()):
        if tok.token_to_id(t["content"]) is None:
            token = AddedToken(
                t["content"],
                single_word=t.get("single_word", False),
                lstrip=t.get("lstrip", False),
                rstrip=t.get("rstrip", False),
                normalized=t.get("normalized", False),
                special=t.get("special", True),
            )
            if token.special:
                tok.add_special_tokens([token])
            else:
                tok.add_tokens([token])
        if tok.token_to_id(t["content"]) != token_id:
            raise ModelDirError(
                f"{model_dir}: added token {t['content']!r} should have id {token_id}, "
                f"got {tok.token_to_id(t['content'])} (ids must follow the vocabulary)"
            )
    return tok


class Tokenizer:
    """The checkpoint's tokenizer plus the special-token ids the engine needs, looked up by
    string."""

    def __init__(self, model_dir: Path):
        try:
            self._tok = load_qwen2_tokenizer(model_dir)
        except ModelDirError:
            raise
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise ModelDirError(
                f"{model_dir}: cannot load the tokenizer ({str(e).strip().splitlines()[0]})"
            ) from e
        self.ids = {s: self._id(s) for s in (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)}
        self.stop_ids = {self.ids[IM_END]} | (
            {self._id(EOS)} if self._tok.token_to_id(EOS) is not None else set()
        )
        # Grounding markup stays in answers (the parser reads boxes from it) though the tokenizer
        # calls it special; every other special token is dropped.
        self.kept_ids = {
            token_id: token
            for token in GROUNDING_TOKENS
            if (token_id := self._tok.token_to_id(token)) is not None
        }

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ModelDirError(f"tokenizer lacks the special token {token!r}")
        return token_id

    def encode(self, text: str, markup: bool = True) -> list[int]:
        """``markup``: special-token text (``<|im_end|>``) becomes the special token; False keeps it
        as plain characters (for what a user typed)."""
        self._tok.encode_special_tokens = not markup
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; with ``skip_special_tokens`` the special tokens are dropped except the
        grounding markup (``<ref>``, ``<box>``, ...), which is kept as its text."""
        if not skip_special_tokens or not self.kept_ids.keys() & set(ids):
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        text, run = [], []
        for token_id in ids:
            if token_id in self.kept_ids:
                text += [self._tok.decode(run, skip_special_tokens=True), self.kept_ids[token_id]]
                run = []
            else:
                run.append(token_id)
        return "".join(text) + self._tok.decode(run, skip_special_tokens=True)

    def encode_chat(
        self,
        system_prompt: str,
        question: str,
        image_tiles: list[int],
        tokens_per_tile: int,
        video: bool = False,
        ground: str = "",
    ) -> list[int]:
        """Token ids of the whole chat prompt: system turn, images (tiles per image) or frames, then
        the question; the system prompt and the question as plain text. The pieces meet where the
        pre-tokenizer splits anyway (after a newline, before a special token), so the ids are those
        of the whole prompt string. With ``ground`` (a phrase) the question is InternVL's grounding
        question about it, ``<ref>`` and ``</ref>`` as their special tokens, the phrase as text."""
        if ground:
            question_ids = (
                self.encode(GROUNDING_QUESTION, markup=False)
                + [self._id(REF_START)]
                + self.encode(ground, markup=False)
                + [self._id(REF_END)]
            )
        else:
            question_ids = self.encode(question, markup=False)
        system = (
            self.encode(SYSTEM_TURN[0])
            + self.encode(system_prompt, markup=False)
            + self.encode(SYSTEM_TURN[1])
            if system_prompt
            else []
        )
        return (
            system
            + self.encode(USER_TURN[0] + image_lines(image_tiles, tokens_per_tile, video))
            + question_ids
            + self.encode(USER_TURN[1])
        )


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
