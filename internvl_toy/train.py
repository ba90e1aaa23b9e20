"""``internvl-train-toy``: train the toy InternVL2.5 checkpoint on generated scenes (torch, CPU).

The model is InternVL2.5's architecture at toy size: an InternViT-style encoder (112 px, 8 px
patches, pixel shuffle 0.5, ``mlp1`` projector: 49 tokens per image) and a Qwen2 decoder, trained
through transformers' ``InternVLForConditionalGeneration`` and written back in the original
checkpoint layout (``config.json`` with ``llm_config``/``vision_config``, bf16 ``model.safetensors``
with ``vision_model.*``, ``mlp1.*``, ``language_model.*`` keys, its own byte-level BPE tokenizer
with the chat and image special tokens). Prompts are built with the engine's own tokenizer, chat
template and preprocessing, so training sees exactly what inference sends. Two stages, as InternVL
itself is built: the encoder is pretrained first (``pretrain_vision``), then frozen while the
projector and decoder learn the questions. Seeds are fixed: the same command writes the same
weights on the same torch build.

Development only (needs torch and transformers). Usage::

    internvl-train-toy --out models/internvl-toy
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file

from internvl_engine import InternVLError
from internvl_engine.config import DEFAULT_SYSTEM_PROMPT
from internvl_engine.grounding import iou, parse_boxes
from internvl_engine.models.internvl import language_model
from internvl_engine.preprocess import normalize, tiles
from internvl_engine.prompt import EOS, IM_END, IMG_CONTEXT, IMG_START, Tokenizer
from internvl_engine.tools.export import TOKENIZER_FILES
from internvl_engine.tools.make_tiny import TOKENIZER_TEXT, hf_config, write_tokenizer
from internvl_engine.tools.reference import load_reference, original_state_dict, reference_config

from .scenes import (
    CLIP_FRAMES,
    COLORS,
    POSITIONS,
    SHAPES,
    TASKS,
    VIDEO_TASKS,
    Sample,
    corpus,
    grounding_corpus,
    scene,
)

VISION = dict(
    image_size=112,
    patch_size=8,
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=384,
)
LLM = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
# How often each task is drawn, before its running error rate scales it (see ERROR_FLOOR). The
# questions that match a word of the question against the image tokens (where, which_image) are
# learnt last, so they weigh most; colour is learnt first. (With these weights fixed, drawing
# which_image at 3 to 3.5 got it to 98.5-100 % but left where at 69.5-91 % in the 20 minutes: the
# two competed for steps. Drawing colour, shape, count and the clips at a quarter to a half, with
# the decoder's rate doubled, lost shapes: 39 % instead of 99 %.)
TASK_WEIGHTS = {
    "color": 0.5,
    "shape": 1.0,
    "where": 2.0,
    "count": 1.5,
    "which_image": 2.0,
    "motion": 1.0,
    "appear": 1.0,
    "is_there": 1.5,
    "ground": 3.0,
    "ground_rival": 3.0,
}
# Share of batches made of clips; a batch is all clips or all pictures (less padding). Clips cost 8
# pictures each and the video questions are learnt early, so their batches are fewer and half size.
VIDEO_BATCHES = 0.15
# stage 1, see pretrain_vision: ~100 % of single shapes named by then Curriculum: the decoder first
# has to learn to read the image tokens at all, which single-shape colour and shape questions teach
# fastest (from random init, mixed tasks sat at chance for 500+ steps).
VISION_STEPS, VISION_LR = (
    800,
    1e-3,
)
FIRST_TASKS, FIRST_STEPS = ("color", "shape"), 200
REGION_LR = 2e-3  # pretrain_regions: box hundreds 0.60 after 200 steps, 0.43 at 1e-3
# Each task is drawn in proportion to its TASK_WEIGHTS times (its error rate on recent batches,
# a running average at ERROR_RATE per batch, + ERROR_FLOOR): steps go to the questions not learnt
# yet, whichever of where and which_image that is, and learnt ones are still rehearsed.
ERROR_RATE, ERROR_FLOOR = 0.1, 0.1
HINT_LAYER = 2  # stage 2's hints (see Hints) read the decoder's state after this many layers
SUBJECTS = [*COLORS, *SHAPES]
REGION_NAMES = [f"{c} {s}" for c in COLORS for s in SHAPES]


class Encoder:
    """Samples -> token ids, labels and pixel values, as the engine would prompt the model."""

    def __init__(self, model_dir: Path, image_size: int, tokens_per_image: int):
        self.tok = Tokenizer(model_dir)
        self.image_size, self.tokens_per_image = image_size, tokens_per_image
        self.end = self.tok.ids[IM_END]
        self.pad = self.tok._id(EOS)

    def encode(self, sample: Sample) -> tuple[list[int], list[int], list[np.ndarray]]:
        prompt = self.tok.encode_chat(
            DEFAULT_SYSTEM_PROMPT,
            sample.question,
            [1] * len(sample.images),
            self.tokens_per_image,
            sample.video,
            ground=sample.ground,
        )
        answer = self.tok.encode(sample.answer) + [self.end]
        tile_list = [tiles(image, self.image_size, 1)[0] for image in sample.images]
        return prompt + answer, [-100] * len(prompt) + answer, tile_list

    def image_index(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``ids`` holds image tokens, and which image of its prompt (0, 1, ...) each position
        is in."""
        return ids == self.tok.ids[IMG_CONTEXT], torch.cumsum(
            ids == self.tok.ids[IMG_START], dim=1
        ) - 1

    def batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(s) for s in samples]
        width = max(len(ids) for ids, _, _ in encoded)
        ids = torch.full((len(samples), width), self.pad, dtype=torch.long)
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (i, lab, _) in enumerate(encoded):
            ids[row, : len(i)] = torch.tensor(i)
            labels[row, : len(lab)] = torch.tensor(lab)
            attention[row, : len(i)] = 1
        pixels = normalize([t for _, _, tile_list in encoded for t in tile_list])
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": attention,
            "pixel_values": torch.from_numpy(pixels),
        }


def answer_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, samples: list[Sample], tokenizer: Tokenizer
) -> torch.Tensor:
    """Per sample: 1 where every answer token (and the stop token) is the argmax (teacher-forced);
    for a grounding question, where the box those argmax tokens write has IoU >= 0.5 with the true
    one (a box is right without every digit right)."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    scored = target != -100
    correct = ((predicted == target) | ~scored).all(dim=1).float()
    for row, sample in enumerate(samples):
        if sample.ground:
            text = tokenizer.decode(predicted[row][scored[row]].tolist())
            height, width = sample.images[0].shape[:2]
            boxes, _ = parse_boxes(text, [(width, height)])
            correct[row] = float(bool(boxes) and iou(boxes[0].corners, sample.box) >= 0.5)
    return correct


def digit_accuracy(logits: torch.Tensor, labels: torch.Tensor, tokenizer: Tokenizer) -> list:
    """Per answer that writes a box: the share of its digits the argmax gets right
    (teacher-forced), a finer view of grounding's progress than whole boxes."""
    predicted, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    digits = torch.tensor(
        [tokenizer.decode([i]).isdigit() if i >= 0 else False for i in range(logits.shape[-1])]
    )
    shares = []
    for row in range(target.shape[0]):
        scored = (target[row] != -100) & digits[target[row].clamp(min=0)]
        if scored.sum() >= 4:
            shares.append(float((predicted[row][scored] == target[row][scored]).float().mean()))
    return shares


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer tokens, averaged per answer, then over answers: each question
    counts once, so a grounding answer's 30 tokens do not outweigh thirty one-word answers."""
    target = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none"
    )
    tokens = (target != -100).sum(dim=1).clamp(min=1)
    return (losses.sum(dim=1) / tokens).mean()


def digit_loss(logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` [n, 4 * 20] naming the hundreds and tens digits of each of the
    four ``corners`` [n, 4] (fractions of the image, written as 0..1000)."""
    numbers = (corners.clamp(0, 0.999) * 1000).long()
    targets = torch.stack([numbers // 100, numbers // 10 % 10], dim=2)  # [n, 4, 2]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, 10), targets.reshape(-1), reduction="mean"
    )


class Hints(torch.nn.Module):
    """Stage 2's training hints: linear probes on the decoder's state after ``HINT_LAYER`` layers.

    "Where is the red shape?" and "Which image has a triangle?" need two steps before the answer can
    be read: the positions that give the answer fetch the question's colour or shape word, and image
    tokens learn which image they are in (from the ``Image-N:`` before it); only then can attention
    match the word against the image tokens. Neither step lowers the answer's loss until the other
    exists, and the decoder trained from scratch sat at chance on two or three shapes or images (in
    runs of up to 2500 steps). These probes teach the two steps directly: the positions that predict
    answer tokens name the question's subject word, image tokens of multi-image prompts (clips
    included) name their image's number. Both are learnt within 200 steps of the first such
    question, and the matching follows (where 66 % -> 98 %, which_image 52.5 % -> 78.5 % through the
    engine with fixed task weights; 100 % and 99 % with tasks drawn by error rate; see the model
    card). The probes are thrown away afterwards, like stage 1's; the checkpoint is the plain
    architecture.
    """

    def __init__(self, hidden_size: int, grid: int, boxes: bool = True, names: bool = True):
        super().__init__()
        # the grounding hints below, which train the encoder's output: where each token is and
        # the box of the shape it is on (boxes), what shape it is on (names)
        self.boxes, self.names = boxes, names
        self.subject = torch.nn.Linear(hidden_size, len(SUBJECTS))
        self.image = torch.nn.Linear(hidden_size, max(CLIP_FRAMES, 3))
        self.grid = grid  # image tokens per row and column
        self.place = torch.nn.Linear(hidden_size, 2 * grid)
        # a box's corners as the answer writes them: per coordinate, its hundreds and tens digits
        self.region = torch.nn.Linear(hidden_size, 4 * 20)
        self.box = torch.nn.Linear(hidden_size, 4 * 20)
        self.name = torch.nn.Linear(hidden_size, len(REGION_NAMES))

    def loss(
        self,
        hidden: torch.Tensor,
        batch: dict[str, torch.Tensor],
        samples: list[Sample],
        encoder: Encoder,
    ) -> torch.Tensor:
        ids, labels = batch["input_ids"], batch["labels"]
        hidden, embeds = hidden if isinstance(hidden, tuple) else (hidden, None)
        gives_answer = torch.zeros_like(labels, dtype=torch.bool)
        gives_answer[:, :-1] = labels[:, 1:] != -100
        subject = torch.tensor([SUBJECTS.index(s.subject) if s.subject else -100 for s in samples])
        subject = subject[:, None].expand_as(ids)
        asks = gives_answer & (subject != -100)
        is_image, image = encoder.image_index(ids)
        is_image &= torch.tensor([len(s.images) > 1 for s in samples])[:, None]
        loss = hidden.new_zeros(())
        if asks.any():
            loss = loss + torch.nn.functional.cross_entropy(
                self.subject(hidden[asks]), subject[asks]
            )
        if is_image.any():
            loss = loss + torch.nn.functional.cross_entropy(
                self.image(hidden[is_image]), image[is_image]
            )
        grounding = torch.tensor([bool(s.ground) for s in samples])
        if not (self.boxes or self.names) or embeds is None or not grounding.any():
            return loss
        # from what the decoder reads (the projector's output), normalised: that output is large,
        # and the probes' first losses would swamp the answers' gradients under the clipped norm
        tokens = embeds[grounding][encoder.image_index(ids[grounding])[0]]
        normed = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:])
        regions, names = token_regions([s for s in samples if s.ground], self.grid)
        on_shape = ~regions.isnan().any(dim=1)
        if self.names and on_shape.any():
            # each image token on a shape names its colour and shape: a linear probe read the
            # shape from 75 % of run 18's tokens (94 % averaged over a shape), and where another
            # shape had the named one's colour, run 18 took either about as often
            loss = loss + torch.nn.functional.cross_entropy(
                self.name(normed[on_shape]), names[on_shape]
            )
        if not self.boxes:
            return loss
        # every image token of a grounding prompt names its row and column; the answer's
        # positions name the box
        place = torch.arange(tokens.shape[0]) % (self.grid * self.grid)
        logits = self.place(normed)
        loss = loss + torch.nn.functional.cross_entropy(logits[:, : self.grid], place // self.grid)
        loss = loss + torch.nn.functional.cross_entropy(logits[:, self.grid :], place % self.grid)
        # each image token on a shape names that shape's box: the decoder then finds a box by
        # averaging the tokens of the named shape, which attention does, instead of taking the
        # extreme rows and columns of a set of tokens, which it does not
        if on_shape.any():
            loss = loss + digit_loss(self.region(normed[on_shape]), regions[on_shape])
        boxes = torch.tensor(
            [
                [c / size for c, size in zip(s.box, s.images[0].shape[1::-1] * 2)]
                if s.ground
                else [0.0] * 4
                for s in samples
            ]
        )
        asks_box = gives_answer & grounding[:, None]
        target = boxes[:, None, :].expand(*ids.shape, 4)
        loss = loss + digit_loss(
            self.box(torch.nn.functional.layer_norm(hidden[asks_box], hidden.shape[-1:])),
            target[asks_box],
        )
        return loss


def step_gradients(
    model, hints: Hints, encoder: Encoder, samples: list[Sample]
) -> tuple[float, float, torch.Tensor]:
    """Accumulate one batch's gradients; return its answer loss, hint loss and per-sample accuracy.

    Prompts with the same number of images have about the same length, so each such group runs as
    its own pass and one-image prompts are not padded to the length of three-image ones (padding was
    about a third of a mixed picture batch; its forward and backward took 0.42 s instead of 0.61 s).
    Each group's losses count by its share of the batch's questions (see ``answer_loss``).
    """
    counts = np.array([len(s.images) for s in samples])
    groups = [np.flatnonzero(counts == n) for n in np.unique(counts)]
    parts = [[samples[i] for i in rows] for rows in groups]
    batches = [encoder.batch(part) for part in parts]
    loss = hint_loss = 0.0
    correct = torch.empty(len(samples))
    digits = []
    for rows, part, batch in zip(groups, parts, batches):
        share = len(part) / len(samples)
        labels = batch.pop("labels")
        result = model(**batch, output_hidden_states=True)
        group_loss = answer_loss(result.logits, labels)
        batch["labels"] = labels
        group_hint_loss = hints.loss(
            (result.hidden_states[HINT_LAYER], result.hidden_states[0]), batch, part, encoder
        )
        (share * (group_loss + group_hint_loss)).backward()
        loss, hint_loss = (
            loss + share * group_loss.item(),
            hint_loss + share * group_hint_loss.item(),
        )
        correct[rows] = answer_accuracy(result.logits.detach(), labels, part, encoder.tok)
        digits += digit_accuracy(result.logits.detach(), labels, encoder.tok)
    return loss, hint_loss, correct, (sum(digits) / len(digits) if digits else None)


def pretrain_vision(
    model, rng, steps: int, batch_size: int, lr: float, image_size: int, log
) -> None:
    """Stage 1: teach the vision encoder what a shape is and where, before it speaks through the
    decoder.

    InternViT comes to InternVL pretrained; ours starts from random weights, and through the decoder
    alone it learnt shapes slowly (a shape-only run was at 50 % after 700 steps, while a classifier
    on the encoder's features reached 85 % in 300). So a linear probe on every image token (encoder,
    pixel shuffle, ``mlp1``: what the decoder reads), max-pooled over the picture, is trained with
    them to name the shape, colour and column (left / center / right) of a single shape; the tokens
    that show the shape learn to say so, position included (the decoder's rotary positions do not
    tell it where a token sits in the picture). The probe is thrown away afterwards.
    """
    heads = {"shape": list(SHAPES), "color": list(COLORS), "column": list(POSITIONS)}
    vision = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    probe = torch.nn.Linear(
        model.config.text_config.hidden_size, sum(len(v) for v in heads.values())
    )
    optimizer = torch.optim.AdamW([*vision, *probe.parameters()], lr=lr, weight_decay=0.01)
    for step in range(1, steps + 1):
        scenes = [scene(rng, n=1) for _ in range(batch_size)]
        pixels = torch.from_numpy(
            normalize([tiles(picture, image_size, 1)[0] for _, picture in scenes])
        )
        shapes = [shapes[0] for shapes, _ in scenes]
        targets = {
            "shape": torch.tensor([SHAPES.index(s.shape) for s in shapes]),
            "color": torch.tensor([list(COLORS).index(s.color) for s in shapes]),
            "column": torch.tensor([int(s.x * len(POSITIONS)) for s in shapes]),
        }
        tokens = model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output
        logits = dict(
            zip(heads, probe(tokens).amax(dim=1).split([len(v) for v in heads.values()], dim=1))
        )
        loss = sum(torch.nn.functional.cross_entropy(logits[h], targets[h]) for h in heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            log(
                f"vision step {step}/{steps} loss {loss.item():.4f} "
                + " ".join(
                    f"{h}={(logits[h].argmax(1) == targets[h]).float().mean():.2f}" for h in heads
                )
            )


def save(model, out: Path) -> None:
    """The weights in the original layout, bf16, as ``out``'s model.safetensors."""
    weights = {
        k: v.detach().float().numpy().astype(ml_dtypes.bfloat16)
        for k, v in original_state_dict(model).items()
    }
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def token_regions(samples: list[Sample], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image token of each grounding sample (one image each): the box of the shape its
    centre is on (fractions of the image; NaN off every shape), [len(samples) * grid * grid, 4],
    and that shape's index in REGION_NAMES (-100 off every shape)."""
    place = torch.arange(grid * grid)
    centres = (torch.stack([place % grid, place // grid], 1) + 0.5) / grid
    regions = torch.full((len(samples), grid * grid, 4), float("nan"))
    names = torch.full((len(samples), grid * grid), -100)
    for k, sample in enumerate(samples):
        for region, name in zip(sample.regions, sample.region_names, strict=True):
            r = torch.tensor(region)
            inside = (
                (centres[:, 0] >= r[0])
                & (centres[:, 0] <= r[2])
                & (centres[:, 1] >= r[1])
                & (centres[:, 1] <= r[3])
            )
            regions[k][inside] = r
            names[k][inside] = REGION_NAMES.index(name)
    return regions.reshape(-1, 4), names.reshape(-1)


def pretrain_regions(
    model, rng, steps: int, batch_size: int, lr: float, image_size: int, grid: int, log
) -> None:
    """Stage 1 for grounding: the encoder learns to write on each image token of a shape that
    shape's box (its corners' hundreds and tens digits, as the answer writes them), with the stage 1
    heads on single shapes kept (shape, colour, column).

    Trained only through the decoder (stage 2 with the encoder trainable and the same probe as a
    hint), the box digits stayed at chance for 700 steps; on the encoder alone they are learnt in
    hundreds of steps at a third of a decoder step's cost. A decoder that averages the tokens of the
    named shape (what attention does) then reads the box from them, instead of finding the extreme
    rows and columns of a set of tokens (which it does not)."""
    heads = {"shape": list(SHAPES), "color": list(COLORS), "column": list(POSITIONS)}
    hidden = model.config.text_config.hidden_size
    probe = torch.nn.Linear(hidden, sum(len(v) for v in heads.values()))
    region = torch.nn.Linear(hidden, 4 * 20)
    vision = [
        *model.model.vision_tower.parameters(),
        *model.model.multi_modal_projector.parameters(),
    ]
    optimizer = torch.optim.AdamW(
        [*vision, *probe.parameters(), *region.parameters()], lr=lr, weight_decay=0.01
    )

    def features(pictures):
        pixels = torch.from_numpy(normalize([tiles(p, image_size, 1)[0] for p in pictures]))
        return model.model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-1, vision_feature_select_strategy="default"
        ).pooler_output

    for step in range(1, steps + 1):
        grounding = [TASKS["ground"](rng) for _ in range(batch_size)]
        singles = [scene(rng, n=1) for _ in range(batch_size // 2)]
        tokens = features([s.images[0] for s in grounding])
        regions, _ = token_regions(grounding, grid)
        on_shape = ~regions.isnan().any(dim=1)
        flat = tokens.reshape(-1, tokens.shape[-1])
        normed = torch.nn.functional.layer_norm(flat[on_shape], flat.shape[-1:])
        logits = region(normed)
        loss = digit_loss(logits, regions[on_shape])
        shapes = [shapes[0] for shapes, _ in singles]
        targets = {
            "shape": torch.tensor([SHAPES.index(s.shape) for s in shapes]),
            "color": torch.tensor([list(COLORS).index(s.color) for s in shapes]),
            "column": torch.tensor([int(s.x * len(POSITIONS)) for s in shapes]),
        }
        kept = dict(
            zip(
                heads,
                probe(features([p for _, p in singles]))
                .amax(dim=1)
                .split([len(v) for v in heads.values()], dim=1),
            )
        )
        # the kept heads are learnt already: a third of the weight keeps them without slowing the
        # boxes (at full weight the box digits' hundreds were right 0.32 after 800 steps, alone 0.71
        # after 600)
        loss = loss + sum(torch.nn.functional.cross_entropy(kept[h], targets[h]) for h in heads) / 3
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps:
            numbers = (regions[on_shape].clamp(0, 0.999) * 1000).long() // 100
            hundreds = (logits.reshape(-1, 4, 2, 10)[:, :, 0].argmax(-1) == numbers).float()
            log(
                f"region step {step}/{steps} loss {loss.item():.4f} "
                f"box hundreds={hundreds.mean():.2f} "
                + " ".join(
                    f"{h}={(kept[h].argmax(1) == targets[h]).float().mean():.2f}" for h in heads
                )
            )


def new_model(out: Path):
    """A toy InternVL2.5 of random weights, its tokenizer and config written to ``out``."""
    from transformers import InternVLForConditionalGeneration

    special = write_tokenizer(
        out,
        bpe_vocab_size=512,
        text=[DEFAULT_SYSTEM_PROMPT, *TOKENIZER_TEXT[1:8], *corpus(), *grounding_corpus()],
    )
    cfg = hf_config(VISION, {**LLM, "vocab_size": max(special.values()) + 1}, special)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]]}, indent=2)
        + "\n"
    )
    return InternVLForConditionalGeneration(reference_config(cfg, special[IMG_CONTEXT], "sdpa"))


def grow_decoder(start: Path, out: Path, after: list[int]) -> None:
    """``start``'s checkpoint written to ``out`` with a copy of each decoder layer in ``after``
    behind it that adds nothing yet (the language model's ``expand_layers``): the grown model
    answers exactly as ``start`` did, and training has more layers to work with without starting
    again from the first stage."""
    from safetensors.numpy import load_file

    cfg = json.loads((start / "config.json").read_text())
    layers = cfg["llm_config"]["num_hidden_layers"]
    if not after or any(not 0 <= i < layers for i in after) or len(set(after)) < len(after):
        raise InternVLError(
            f"--grow-decoder {after}: each must be a different layer of the decoder's {layers}"
        )
    family = language_model(cfg["llm_config"].get("model_type", "qwen2"))
    grown = family.expand_layers(load_file(str(start / "model.safetensors")), layers, after)
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(start, out)
    cfg["llm_config"]["num_hidden_layers"] = layers + len(after)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(grown, str(out / "model.safetensors"), metadata={"format": "pt"})


def copy_tokenizer(start: Path, out: Path) -> None:
    """``start``'s tokenizer and config files into ``out`` (nothing to do where they are one)."""
    if start.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (start / name).is_file():
                shutil.copy2(start / name, out / name)


def trained_model(start: Path, out: Path):
    """The checkpoint at ``start``, to train further; its tokenizer and config copied to ``out``."""
    copy_tokenizer(start, out)
    return load_reference(start, Tokenizer(start).ids[IMG_CONTEXT], "sdpa")


def train(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    start: Path | None = None,
    log=functools.partial(print, flush=True),
    vision_lr: float = 0.0,
    region_steps: int = 0,
    task_weights: dict[str, float] | None = None,
) -> dict:
    """Both stages on a new model; from a trained checkpoint (``start``), stage 2 only, on every
    task at once (a task added since, such as is_there, is drawn most while its error rate is
    high). ``task_weights`` replaces some of TASK_WEIGHTS."""
    task_weights = TASK_WEIGHTS | (task_weights or {})
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = new_model(out) if start is None else trained_model(start, out)
    encoder = Encoder(out, VISION["image_size"], model.config.image_seq_length)
    started = time.perf_counter()
    model.train()
    grid = VISION["image_size"] // VISION["patch_size"] // 2  # tokens per row after pixel shuffle
    if start is None:
        pretrain_vision(model, rng, VISION_STEPS, batch_size, VISION_LR, VISION["image_size"], log)
    if region_steps:
        pretrain_regions(
            model, rng, region_steps, batch_size, REGION_LR, VISION["image_size"], grid, log
        )
    first_steps = FIRST_STEPS if start is None else 0
    # Stage 2 keeps the encoder as stage 1 left it (as InternVL's first stage keeps InternViT): the
    # decoder then learns to read shapes in as few steps as colours, and clips skip the encoder's
    # backward.
    model.model.vision_tower.requires_grad_(vision_lr > 0)
    # The grounding hints train the encoder's output; with the encoder frozen they only add noisy
    # gradients (at chance for hundreds of steps) to the decoder's. The box hints also did that to
    # a trained encoder (run 9, from run 8 at 2e-4: engine 34 %; run 14 went without them) and
    # to run 20's box digits, so they come only with the encoder pretraining on boxes.
    hints = Hints(
        model.config.text_config.hidden_size,
        grid,
        boxes=vision_lr > 0 and region_steps > 0,
        names=vision_lr > 0,
    )
    vision = list(model.model.vision_tower.parameters()) if vision_lr > 0 else []
    trained = [p for p in model.parameters() if p.requires_grad] + list(hints.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trained if all(p is not v for v in vision)]},
            *([{"params": vision, "lr": vision_lr}] if vision else []),
        ],
        lr=lr,
        weight_decay=0.01,
        betas=(0.9, 0.98),
    )
    # linear warm-up, constant, cosine decay over the last quarter
    warmup, decay = (
        50,
        int(steps * 0.75),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / warmup,
            0.5 * (1 + math.cos(math.pi * min(1.0, max(0, s - decay) / max(1, steps - decay)))),
        ),
    )
    names = np.array(list(TASK_WEIGHTS))
    buckets = [names[np.isin(names, VIDEO_TASKS, invert=not video)] for video in (False, True)]
    first = np.array(FIRST_TASKS)
    # running share of wrong answers, per task (see ERROR_FLOOR)
    errors = dict.fromkeys(TASK_WEIGHTS, 1.0)
    history = []
    for step in range(1, steps + 1):
        video = step > first_steps and rng.random() < VIDEO_BATCHES
        bucket = buckets[1] if video else first if step <= first_steps else buckets[0]
        weights = np.array([task_weights[t] * (errors[t] + ERROR_FLOOR) for t in bucket])
        tasks = rng.choice(
            bucket, batch_size // 2 if video else batch_size, p=weights / weights.sum()
        )
        samples = [TASKS[str(t)](rng) for t in tasks]
        optimizer.zero_grad(set_to_none=True)
        loss, hint_loss, correct, digits = step_gradients(model, hints, encoder, samples)
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        by_task = {t: float(correct[tasks == t].mean()) for t in names if (tasks == t).any()}
        for t, accuracy in by_task.items():
            errors[t] += ERROR_RATE * (1 - accuracy - errors[t])
        if step % 25 == 0 or step == steps:
            history.append(
                {"step": step, "loss": loss, "hint_loss": hint_loss, "batch_accuracy": by_task}
                | ({"box_digits": digits} if digits is not None else {})
            )
            if step % 250 == 0:  # a snapshot to look at while it trains
                save(model, out)
            log(
                f"step {step}/{steps} loss {loss:.4f} hints {hint_loss:.4f} "
                + (f"box digits {digits:.2f} " if digits is not None else "")
                + f"{time.perf_counter() - started:.0f}s "
                + " ".join(f"{t}={a:.2f}" for t, a in by_task.items())
                + " | error rates "
                + " ".join(f"{t}:{e:.2f}" for t, e in errors.items())
            )
    minutes = (time.perf_counter() - started) / 60
    save(model, out)
    log(f"trained {steps} steps of {batch_size} in {minutes:.1f} min; wrote {out}")
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "minutes": round(minutes, 1),
        **({"from": str(start)} if start else {}),
        **({"vision_lr": vision_lr} if vision_lr else {}),
        **({"region_steps": region_steps} if region_steps else {}),
        **({"task_weights": task_weights} if task_weights != TASK_WEIGHTS else {}),
        "history": history,
    }


def task_weight(item: str) -> tuple[str, float]:
    """--task-weight's TASK=WEIGHT, checked before the encoder stage (an unknown task would be a
    KeyError, a weight of 0 or NaN a draw by NaN probabilities, minutes later)."""
    task, _, weight = item.partition("=")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if task not in TASK_WEIGHTS or not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"{item!r}: expected TASK=WEIGHT with TASK one of {', '.join(TASK_WEIGHTS)} and "
            "WEIGHT a number > 0"
        )
    return task, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-train-toy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the toy InternVL2.5 checkpoint on generated scenes of coloured shapes, "
        "with torch on\n"
        "the CPU (requirements/dev.txt): the encoder first, then the decoder on every question "
        "type.\n"
        "About 18 minutes on a 2-core machine.",
        epilog="Examples:\n  internvl-train-toy --out models/internvl-toy\n"
        "  internvl-train-toy --from models/internvl-toy --out toy-2 --steps 300 --lr 5e-4   # "
        "train further",
    )
    ap.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=1600, help="decoder steps, after the encoder's")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="decoder stage's peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--from",
        dest="start",
        type=Path,
        metavar="CHECKPOINT",
        help="a trained toy checkpoint to train further (its tokenizer kept, stage 2 only): e.g. "
        "on "
        "a question type added since",
    )
    ap.add_argument(
        "--vision-lr",
        type=float,
        default=0.0,
        help="train the encoder in the decoder stage too, at this peak rate (default 0: frozen, "
        "as the base was trained), with a hint: each image token on a shape names it",
    )
    ap.add_argument(
        "--region-steps",
        type=int,
        default=0,
        help="steps of encoder pretraining on where shapes are (each image token names its shape's "
        "box) before the decoder stage, whose hints then name boxes too (default 0; see "
        "pretrain_regions)",
    )
    ap.add_argument(
        "--grow-decoder",
        type=int,
        nargs="+",
        default=[],
        metavar="LAYER",
        help="with --from: first insert a copy of each of these decoder layers behind it, its "
        "output projections zeroed so the model answers as before (see grow_decoder)",
    )
    ap.add_argument(
        "--task-weight",
        type=task_weight,
        action="append",
        default=[],
        metavar="TASK=WEIGHT",
        help="draw a question type in this proportion instead of its default (TASK_WEIGHTS), "
        "e.g. ground=6; repeatable",
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = ap.parse_args(argv)
    # Checked first: the encoder stage runs for minutes before --steps or --lr come into play.
    if args.steps < 1 or args.batch_size < 1 or not (args.lr > 0 and math.isfinite(args.lr)):
        ap.error("--steps and --batch-size must be >= 1, --lr a number > 0")
    if not (args.vision_lr >= 0 and math.isfinite(args.vision_lr)):
        ap.error("--vision-lr must be a number >= 0")
    if args.seed < 0 or (args.threads or 0) < 0 or args.region_steps < 0:
        ap.error("--seed, --threads and --region-steps must be >= 0")
    if args.start and not (args.start / "config.json").is_file():  # before --out is made
        ap.error(f"--from {args.start}: not a checkpoint directory (no config.json)")
    if args.grow_decoder and not args.start:
        ap.error("--grow-decoder grows a trained checkpoint: give it --from")
    if args.threads:
        torch.set_num_threads(args.threads)
    earlier = args.start / "training_log.json" if args.start else None
    # read before --out overwrites it
    earlier = json.loads(earlier.read_text()) if earlier and earlier.is_file() else None
    try:
        if args.grow_decoder:
            grow_decoder(args.start, args.out, args.grow_decoder)
        report = train(
            args.out,
            args.steps,
            args.batch_size,
            args.lr,
            args.seed,
            args.out if args.grow_decoder else args.start,
            vision_lr=args.vision_lr,
            region_steps=args.region_steps,
            task_weights=dict(args.task_weight),
        )
    except InternVLError as e:
        print(f"internvl-train-toy: error: {e}", file=sys.stderr)
        return 2
    if args.grow_decoder:
        report["from"], report["grow_decoder"] = str(args.start), args.grow_decoder
    if earlier:
        report["earlier"] = earlier  # how the starting checkpoint was trained
    (args.out / "training_log.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
