"""``internvl-export-native``: an original-layout InternVL checkpoint as transformers' native
InternVL directory (``InternVLForConditionalGeneration``, its ``InternVLProcessor`` and a chat
template), the format vLLM serves without ``trust_remote_code``.

The chat template writes the prompt this engine writes (docs/export.md): the InternVL2.5 system
prompt unless the request has a system message, then the user's images before the question, one
``<IMG_CONTEXT>`` line each, labelled ``Image-k:`` when there are several; the processor expands
each into ``<img>`` + ``<IMG_CONTEXT>`` x image_seq_length + ``</img>``. So a server fed this
directory sees the same prompt token ids as the engine. Dynamic tiling is off (one tile per image,
the engine's default and the node's); the weights are written as float32.

Development only (transformers builds the config): ``requirements/dev.txt``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from ..config import DEFAULT_SYSTEM_PROMPT
from ..errors import InternVLError
from ..models import internvit, internvl
from ..prompt import IMG_CONTEXT, IMG_END, IMG_START
from .checkpoint import Checkpoint

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "generation_config.json",
)

# The internvl2_5 template as the engine writes it (prompt.py): a system turn (the default prompt
# unless given), images before the text, labelled when several. Content parts are "image" (vLLM's
# form of an image_url part) or "image_url".
CHAT_TEMPLATE = (
    "{%- set default_system = " + json.dumps(DEFAULT_SYSTEM_PROMPT, ensure_ascii=False) + " -%}\n"
    """{%- if messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}{%- set system = default_system -%}{%- set turns = messages -%}{%- endif -%}
{%- if system is not string -%}{%- set system = system | map(attribute='text') | join('') -%}
{%- endif -%}
{%- if system -%}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif -%}
{%- for message in turns -%}
{{ '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}
{%- set ns = namespace(images=0, i=0) -%}
{%- for part in message['content'] -%}
{%- if part['type'] in ['image', 'image_url'] -%}{%- set ns.images = ns.images + 1 -%}{%- endif -%}
{%- endfor -%}
{%- for part in message['content'] -%}
{%- if part['type'] in ['image', 'image_url'] -%}{%- set ns.i = ns.i + 1 -%}
{%- if ns.images > 1 -%}{{ 'Image-' + ns.i | string + ': ' }}{%- endif -%}
{{ '"""
    + IMG_CONTEXT
    + """\\n' }}
{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{ '<|im_end|>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"""
)


def native_state_dict(ck: Checkpoint, language_model_type: str) -> dict[str, np.ndarray]:
    """The checkpoint's weights under transformers' names (InternViT's fused qkv split in three)."""
    renames = internvl.transformers_names(language_model_type)
    out = {}
    for key in ck.keys():
        tensor = ck.get(key)
        if m := internvit.QKV.match(key):
            for part, chunk in zip("qkv", np.split(tensor, 3, axis=0)):
                name = internvit.TRANSFORMERS_QKV.format(layer=m[1], part=part, kind=m[2])
                out[name] = np.ascontiguousarray(chunk)
            continue
        for pattern, repl in renames:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = tensor
                break
        else:
            raise InternVLError(f"no transformers name for the checkpoint's {key}")
    return out


def export_native(hf_dir: Path, out: Path) -> Path:
    from safetensors.numpy import save_file

    from ..prompt import Tokenizer
    from .reference import reference_config

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tokenizer = Tokenizer(hf_dir)
    config = reference_config(cfg, tokenizer.ids[IMG_CONTEXT], "sdpa")
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = ["InternVLForConditionalGeneration"]
    config.dtype = "float32"
    config.save_pretrained(out)
    lm_type = cfg["llm_config"].get("model_type", "qwen2")
    save_file(native_state_dict(Checkpoint(hf_dir), lm_type), str(out / "model.safetensors"))
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out / name)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    tokenizer_config |= {
        "extra_special_tokens": {
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": "<video>",
        },
        "processor_class": "InternVLProcessor",
    }
    tokenizer_config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    size = config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessorFast",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": False,
        "min_patches": 1,
        "max_patches": 1,
        "size": {"height": size, "width": size},
        "do_resize": True,
        "resample": 3,  # bicubic, as preprocess.py
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    processor = {
        "processor_class": "InternVLProcessor",
        "image_seq_length": config.image_seq_length,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="internvl-export-native",
        description="An original InternVL checkpoint as transformers' native InternVL directory "
        "(InternVLForConditionalGeneration, InternVLProcessor, the engine's chat template), the "
        "format vLLM serves.",
        epilog="Example:\n"
        "  internvl-export-native --hf-model models/internvl-toy --out toy-native\n"
        "  python -m vllm.entrypoints.openai.api_server --model toy-native --enforce-eager",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--hf-model", type=Path, required=True, help="original checkpoint directory")
    ap.add_argument("--out", type=Path, required=True, help="directory to write")
    args = ap.parse_args(argv)
    try:
        export_native(args.hf_model, args.out)
    except (InternVLError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"internvl-export-native: error: {e}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
