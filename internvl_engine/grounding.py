"""Grounded answers: InternVL's boxes, read out of an answer's text into pixels of the source image.

InternVL2.5 is trained to answer ``Please provide the bounding box coordinate of the region this
sentence describes: <ref>the red cup</ref>`` with ``<ref>the red cup</ref><box>[[x1, y1, x2,
y2]]</box>``: corners normalised to 0..1000 of the whole image (OpenGVLab's refcoco evaluation
scales them by the image's width and height), several boxes as ``[[...], [...]]``, a quadrilateral
as ``<quad>[[x1, y1, ..., x4, y4]]</quad>``. Tiling does not change them: the model is told the
whole picture's coordinates, whatever tiles it saw, so undoing the resize is a scale by the source
image's size.

A box the answer writes badly (cut off, three numbers, a corner over 1000, x2 before x1) is kept as
a ``BoxProblem`` that says what is wrong, never clipped into a place the model did not name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidRequestError

# InternVL's grounding prompt (internvl_chat/eval/refcoco/evaluate_grounding.py).
GROUNDING_QUESTION = (
    "Please provide the bounding box coordinate of the region this sentence describes: "
)
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
# The markup the tokenizer keeps in answers (it drops every other special token).
GROUNDING_TOKENS = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END)
SCALE = 1000  # InternVL's coordinates run 0..1000 of the image's width and height
MAX_PHRASE_CHARS = 200

# What the parser looks for, in the order the text holds them: a phrase, a box or quad in its
# markup (closed or cut off), a bare [[...]] (a server that drops special tokens), an image label.
_PATTERN = re.compile(
    r"<ref>(?P<ref>.*?)(?:</ref>|$)"
    r"|<(?P<kind>box|quad)>(?P<body>.*?)(?P<closed></(?:box|quad)>|$)"
    r"|(?P<bare>\[\[[^<]*?\]\])"
    r"|\b(?:Image-|Frame)(?P<image>\d+)\b",
    re.DOTALL,
)
_LIST = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


@dataclass(frozen=True)
class Box:
    """A box the model named, in pixels of the source image (x right, y down, corners inclusive of
    the region: InternVL draws ``[x1, y1, x2, y2]`` round it)."""

    label: str  # the <ref> phrase it follows (the request's phrase where the answer names none)
    image: int  # index of the request's image (or video frame) it is in
    x1: float
    y1: float
    x2: float
    y2: float
    normalized: tuple[int | float, ...]  # as the model wrote it (0..1000), 4 numbers or a quad's 8

    @property
    def corners(self) -> tuple[float, float, float, float]:
        return self.x1, self.y1, self.x2, self.y2

    @property
    def center(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    @property
    def size(self) -> tuple[float, float]:
        return self.x2 - self.x1, self.y2 - self.y1

    def as_dict(self) -> dict:
        return {
            "label": self.label,
            "image": self.image,
            "box": [round(v, 2) for v in (self.x1, self.y1, self.x2, self.y2)],
            "normalized": list(self.normalized),
        }


@dataclass(frozen=True)
class BoxProblem:
    """A box the answer holds but that names no place: what the text says and why it is refused."""

    label: str
    image: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"box {self.text!r} for {self.label!r}: {self.reason}"

    def as_dict(self) -> dict:
        return {"label": self.label, "image": self.image, "text": self.text, "reason": self.reason}


def checked_phrase(phrase: str) -> str:
    """The phrase to ground, stripped; InvalidRequestError where it cannot be asked."""
    phrase = " ".join(str(phrase).split())
    if not phrase:
        raise InvalidRequestError("the phrase to ground is empty")
    if len(phrase) > MAX_PHRASE_CHARS:
        raise InvalidRequestError(
            f"the phrase to ground has {len(phrase)} characters (at most {MAX_PHRASE_CHARS})"
        )
    if any(token in phrase for token in GROUNDING_TOKENS):
        # it would close the <ref> early and the answer's phrase would not match
        raise InvalidRequestError(
            f"the phrase to ground must not hold {', '.join(GROUNDING_TOKENS)}"
        )
    return phrase


def grounding_text(phrase: str) -> str:
    """The grounding question as text (a server tokenizes ``<ref>`` as its special token)."""
    return f"{GROUNDING_QUESTION}{REF_START}{phrase}{REF_END}"


_GROUNDING_QUESTION = re.compile(re.escape(GROUNDING_QUESTION) + r"<ref>(.+?)</ref>\s*$", re.DOTALL)


def grounded_phrase(question: str) -> str:
    """The phrase of a question that is InternVL's grounding question, else "" (a server takes a
    client's grounding question as one: ``<ref>`` becomes its special token)."""
    match = _GROUNDING_QUESTION.match(question.strip())
    return match[1] if match else ""


def parse_boxes(
    text: str, image_sizes: Sequence[tuple[int, int]], phrase: str = ""
) -> tuple[list[Box], list[BoxProblem]]:
    """The boxes in an answer's ``text``, in pixels of the images of ``image_sizes`` ((width,
    height) per image or frame, in prompt order), and the boxes it holds that name no place.

    A box belongs to the image the answer last named (``Image-2``, ``Frame3``), else to the first;
    its label is the ``<ref>`` phrase before it, else ``phrase``.
    """
    boxes: list[Box] = []
    problems: list[BoxProblem] = []
    label, image = phrase, 0
    for match in _PATTERN.finditer(text):
        if match["ref"] is not None:
            label = match["ref"].strip()
        elif match["image"] is not None:
            named = int(match["image"]) - 1
            if 0 <= named < len(image_sizes):
                image = named
        else:
            kind = match["kind"] or "box"
            body = match["body"] if match["kind"] else match["bare"]
            closed = bool(match["closed"]) if match["kind"] else True
            if not image_sizes:
                problems.append(BoxProblem(label, image, body, "the question has no image"))
                continue
            found, bad = _boxes_in(body, closed, kind, label, image, image_sizes[image])
            boxes += found
            problems += bad
    return boxes, problems


def _boxes_in(body, closed, kind, label, image, size):
    quad = kind == "quad"
    width, height = size
    found, bad = [], []
    lists = _LIST.findall(body)
    whole = body.strip()
    complete = closed and whole.startswith("[") and whole.endswith("]") and lists
    if not complete:
        # cut off (max_new_tokens, a stop) or not a list at all: the complete lists before the cut
        # are still boxes, the rest is reported once
        tail = whole[whole.rfind("]") + 1 :] if "]" in whole else whole
        if tail.strip(" ,]"):
            reason = "cut off before its end" if not closed else "not a list of numbers"
            bad.append(BoxProblem(label, image, tail.strip(" ,"), reason))
        elif not lists:
            bad.append(BoxProblem(label, image, whole, "empty"))
    for items in lists:
        numbers = [n.strip() for n in items.split(",")]
        want = 8 if quad else 4
        if len(numbers) != want or not all(_NUMBER.match(n) for n in numbers):
            bad.append(
                BoxProblem(
                    label,
                    image,
                    f"[{items}]",
                    f"{len(numbers)} values where a {kind} has {want} numbers"
                    if all(_NUMBER.match(n) for n in numbers)
                    else "holds something other than numbers",
                )
            )
            continue
        values = [float(n) for n in numbers]
        normalized = tuple(int(v) if v.is_integer() else v for v in values)
        if any(v < 0 or v > SCALE for v in values):
            bad.append(BoxProblem(label, image, f"[{items}]", f"a coordinate outside 0..{SCALE}"))
            continue
        xs, ys = values[0::2], values[1::2]
        if quad:
            x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
        else:
            x1, x2, y1, y2 = xs[0], xs[1], ys[0], ys[1]
            if x2 < x1 or y2 < y1:
                bad.append(
                    BoxProblem(label, image, f"[{items}]", "its second corner is before its first")
                )
                continue
        if x2 == x1 or y2 == y1:
            bad.append(BoxProblem(label, image, f"[{items}]", "it has no area"))
            continue
        found.append(
            Box(
                label,
                image,
                x1 * width / SCALE,
                y1 * height / SCALE,
                x2 * width / SCALE,
                y2 * height / SCALE,
                normalized,
            )
        )
    return found, bad


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
