"""Model configuration: read from an original InternVL2.5 ``config.json`` and kept in the manifest.

The exporter turns the Hugging Face config into a :class:`ModelSpec` and writes it into
``manifest.json``; the runtime reads only the manifest (plus the tokenizer files), so a model
directory is self-contained and the board needs no Hugging Face code.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, ModelDirError
from .models import qwen2
from .models.common import check_fields
from .models.internvit import InternViTArgs
from .models.internvl import LANGUAGE_MODELS, language_model
from .models.qwen2 import Qwen2Args

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "internvl_ros.layers/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# InternVL2.5's default system prompt (template "internvl2_5").
DEFAULT_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)


@dataclass(frozen=True)
class ModelSpec:
    """An InternVL model's sizes and options: its vision encoder's and language model's arguments
    (their family files, ``models/``) and InternVL's own. Written into the manifest as it is
    here."""

    vision: InternViTArgs
    text: Qwen2Args  # the language model family's args (LANGUAGE_MODELS)
    downsample_ratio: float = field(metadata={"max": 1.0})
    template: str
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int
    select_layer: int = field(metadata={"min": -1})
    ps_version: str = field(metadata={"choices": ("v2",)})
    language_model: str = field(
        default=qwen2.MODEL_TYPE, metadata={"choices": tuple(LANGUAGE_MODELS)}
    )

    def __post_init__(self):
        check_fields(self, "spec")
        if self.max_dynamic_patch < self.min_dynamic_patch:
            raise ConfigError(
                f"spec.max_dynamic_patch ({self.max_dynamic_patch}) is below "
                "spec.min_dynamic_patch "
                f"({self.min_dynamic_patch})"
            )

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def num_image_token(self) -> int:
        """<IMG_CONTEXT> tokens per tile: patches per side, shrunk by the pixel shuffle, squared."""
        return int(self.vision.patches_per_side * self.downsample_ratio) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        if not isinstance(d, dict):
            raise TypeError(f"spec must be a mapping, not {type(d).__name__}")
        # manifests written before families had names hold a Qwen2 decoder
        family = language_model(d.get("language_model", qwen2.MODEL_TYPE))
        return cls(
            **{**d, "vision": InternViTArgs(**d["vision"]), "text": family.Args(**d["text"])}
        )

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelSpec":
        """Build from an original InternVL ``config.json`` (``llm_config`` / ``vision_config``)."""
        try:
            v, t = cfg["vision_config"], cfg["llm_config"]
            image_size = int(cfg.get("force_image_size") or v["image_size"])
            model_type = t.get("model_type", qwen2.MODEL_TYPE)
            if model_type not in LANGUAGE_MODELS:
                raise ModelDirError(
                    f"unsupported language model type {model_type!r} (need "
                    f"{' or '.join(LANGUAGE_MODELS)})"
                )
            if cfg.get("ps_version", "v2") != "v2":
                raise ModelDirError(
                    f"unsupported pixel-shuffle version {cfg.get('ps_version')!r} (need v2)"
                )
            if cfg.get("select_layer", -1) != -1:
                raise ModelDirError(f"unsupported select_layer {cfg.get('select_layer')} (need -1)")
            return cls(
                vision=InternViTArgs.from_config(v, image_size),
                text=language_model(model_type).Args.from_config(t),
                downsample_ratio=float(cfg.get("downsample_ratio", 0.5)),
                template=cfg.get("template", "internvl2_5"),
                use_thumbnail=bool(cfg.get("use_thumbnail", True)),
                min_dynamic_patch=int(cfg.get("min_dynamic_patch", 1)),
                max_dynamic_patch=int(cfg.get("max_dynamic_patch", 12)),
                select_layer=int(cfg.get("select_layer", -1)),
                ps_version=cfg.get("ps_version", "v2"),
                language_model=model_type,
            )
        except KeyError as e:
            raise ModelDirError(f"config.json lacks required key {e}") from e
        # a value of the wrong type or range
        except (
            ValueError,
            TypeError,
            AttributeError,
            ConfigError,
        ) as e:
            raise ModelDirError(f"config.json: {e}") from e


@dataclass(frozen=True)
class LayerBuild:
    """How the decoder-layer models were built: the limits the runtime must respect. The defaults
    are the seed's Pulsar2 llm_build."""

    prefill_chunk: int = 128  # tokens per prefill run
    kv_cache_len: int = 2559  # cache rows; the decode step attends to kv_cache_len + 1 columns
    max_prompt_tokens: int = 1152  # longest prompt the build accepts

    def __post_init__(self):
        check_fields(self, "build")
        if self.max_prompt_tokens > self.kv_cache_len:
            raise ConfigError(
                f"build.max_prompt_tokens ({self.max_prompt_tokens}) exceeds the KV cache "
                f"(build.kv_cache_len {self.kv_cache_len})"
            )


@dataclass(frozen=True)
class Manifest:
    spec: ModelSpec
    build: LayerBuild
    # role -> file name (vit, embeddings; decoder: the fused graph; or post and layers: per layer a
    # name, or one name per fixed-shape group)
    files: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # where the weights came from

    def write(self, out_dir: Path) -> None:
        body = {
            "format": MANIFEST_FORMAT,
            "spec": self.spec.to_dict(),
            "build": dataclasses.asdict(self.build),
            "files": self.files,
            "source": self.source,
        }
        (Path(out_dir) / MANIFEST).write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def read(cls, model_dir: Path) -> "Manifest":
        path = Path(model_dir) / MANIFEST
        if not path.is_file():
            raise ModelDirError(
                f"{model_dir}: no {MANIFEST} (export a checkpoint with internvl-export first)"
            )
        try:
            body = json.loads(path.read_text())
            found = body.get("format") if isinstance(body, dict) else None
            if found != MANIFEST_FORMAT:
                raise ModelDirError(f"{path}: format {found!r}, expected {MANIFEST_FORMAT!r}")
            files = body["files"]
            if not (
                isinstance(files, dict)
                and all(_file_names(role, names) for role, names in files.items())
            ):
                raise ConfigError(
                    f"files must map each role to a file name (layers: to a list of names, or of "
                    f"lists of names), not {files!r}"
                )
            return cls(
                spec=ModelSpec.from_dict(body["spec"]),
                build=LayerBuild(**body["build"]),
                files=files,
                source=body.get("source", {}),
            )
        except (ValueError, KeyError, TypeError, ConfigError) as e:
            raise ModelDirError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e


def _file_names(role: str, names) -> bool:
    """Whether a manifest's ``files`` entry is of its role's shape: a file name; for the layers, per
    layer a name or a list of them (one per shape group)."""

    def name(n) -> bool:
        return isinstance(n, str) and n != ""

    if role != "layers":
        return name(names)
    return isinstance(names, list) and all(
        name(n) or isinstance(n, list) and n and all(map(name, n)) for n in names
    )


def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{hf_dir}: no config.json (not an InternVL checkpoint directory)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelDirError(f"{path}: not valid JSON ({e})") from e


SEED_EMBEDDINGS = (
    "model.embed_tokens.weight.bfloat16.bin",
    "model.embed_tokens.weight.npy",
    "model.embed_tokens.weight.float32.bin",
)


@dataclass(frozen=True)
class ModelLayout:
    """The files of a model directory: an exported one (manifest) or a Pulsar2 seed directory."""

    spec: ModelSpec
    build: LayerBuild | None  # None: read from the layer models' shape groups
    vit: Path | None  # None: text only
    post: Path | None  # None with a fused decoder
    embeddings: Path
    layers: list  # per layer, a file or one file per shape group; empty with a fused decoder
    decoder: Path | None = None  # the fused decoder graph (internvl-export --contract fused)
    # the fused decoder's graph for prompts (internvl-export --prefill int8)
    prompt_decoder: Path | None = None

    def layer_files(self) -> list[Path]:
        return [p for layer in self.layers for p in (layer if isinstance(layer, list) else [layer])]

    @classmethod
    def find(
        cls, model_dir: Path, hf_dir: Path | None = None, vit_model: Path | None = None
    ) -> "ModelLayout":
        model_dir = Path(model_dir)
        vit = Path(vit_model) if vit_model else None
        if vit is not None and not vit.is_file():
            raise ModelDirError(f"{vit}: no such ViT model file")
        if (model_dir / MANIFEST).is_file():
            m = Manifest.read(model_dir)
            named = lambda role: model_dir / m.files[role] if role in m.files else None  # noqa: E731
            layers = [
                [model_dir / g for g in f] if isinstance(f, list) else model_dir / f
                for f in m.files.get("layers", [])
            ]
            layout = cls(
                m.spec,
                m.build,
                vit or named("vit"),
                named("post"),
                named("embeddings"),
                layers,
                named("decoder"),
                named("prompt_decoder"),
            )
            if (layout.decoder is None) == (layout.post is None):
                raise ModelDirError(
                    f"{model_dir}/{MANIFEST}: needs either a decoder or a post model and layers"
                )
            if layout.prompt_decoder and not layout.decoder:
                raise ModelDirError(
                    f"{model_dir}/{MANIFEST}: a prompt decoder needs a fused decoder beside it"
                )
            if layers and len(layers) != m.spec.text.num_layers:
                raise ModelDirError(
                    f"{model_dir}/{MANIFEST}: files name {len(layers)} layer models, "
                    f"spec.text.num_layers is {m.spec.text.num_layers}"
                )
            files = (
                layout.vit,
                layout.post or layout.decoder,
                layout.prompt_decoder,
                layout.embeddings,
                *layout.layer_files(),
            )
            if missing := [p.name for p in files if p is not None and not p.is_file()]:
                raise ModelDirError(f"{model_dir}: missing model files: {', '.join(missing)}")
            return layout
        numbered = {
            int(m[1]): p
            for p in model_dir.glob("*.axmodel")
            if (m := re.search(r"_l(\d+)_together\.axmodel$", p.name))
        }
        if not numbered:
            raise ModelDirError(
                f"{model_dir}: no {MANIFEST} (export a checkpoint with internvl-export first) "
                "and no Pulsar2 layer files (*_l{i}_together.axmodel)"
            )
        if hf_dir is None:
            raise ModelDirError(
                f"{model_dir} is a Pulsar2 directory without a manifest: give the original "
                "checkpoint directory (--hf_model) for config.json and the tokenizer"
            )
        spec = ModelSpec.from_hf_config(read_hf_config(hf_dir))
        if sorted(numbered) != list(range(spec.text.num_layers)):
            raise ModelDirError(
                f"{model_dir}: layer files for layers {sorted(numbered)}, the model has "
                f"{spec.text.num_layers} (0..{spec.text.num_layers - 1})"
            )
        posts = sorted(model_dir.glob("*_post.axmodel"))
        if len(posts) != 1:
            raise ModelDirError(f"{model_dir}: need exactly one *_post.axmodel, found {len(posts)}")
        embeddings = next(
            (model_dir / n for n in SEED_EMBEDDINGS if (model_dir / n).is_file()), None
        )
        if embeddings is None:
            raise ModelDirError(f"{model_dir}: no embedding table ({' or '.join(SEED_EMBEDDINGS)})")
        if vit is None:
            vits = sorted(model_dir.glob("*vit*.axmodel"))
            if len(vits) > 1:
                raise ModelDirError(
                    f"{model_dir}: several ViT models ({', '.join(v.name for v in vits)}); "
                    "choose one with --vit_model"
                )
            vit = vits[0] if vits else None
        return cls(
            spec,
            None,
            vit,
            posts[0],
            embeddings,
            [numbered[i] for i in range(spec.text.num_layers)],
        )
