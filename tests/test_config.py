"""The model configuration refuses values of the wrong type or range where it is read (the manifest,
config.json, export options), naming the field, instead of failing later inside numpy or
onnxruntime."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from conftest import update_field

from internvl_engine import ConfigError, ModelDirError
from internvl_engine.config import LayerBuild, Manifest, ModelSpec
from internvl_engine.tools.make_tiny import make_tiny


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    """A valid spec, as the manifest holds it."""
    hf = make_tiny(tmp_path_factory.mktemp("hf"))
    return ModelSpec.from_hf_config(json.loads((hf / "config.json").read_text())).to_dict()


def edited(spec: dict, path: str, value) -> dict:
    out = json.loads(json.dumps(spec))
    update_field(out, path, lambda _: value)
    return out


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("text.head_dim", "32", "spec.text.head_dim must be an integer >= 1, not '32'"),
        ("text.num_layers", 4.0, "spec.text.num_layers must be an integer >= 1, not 4.0"),
        ("text.vocab_size", 0, "spec.text.vocab_size must be an integer >= 1, not 0"),
        ("text.num_kv_heads", True, "spec.text.num_kv_heads must be an integer >= 1, not True"),
        ("text.rope_theta", -1.0, "spec.text.rope_theta must be a number > 0, not -1.0"),
        ("text.rms_norm_eps", math.nan, "spec.text.rms_norm_eps must be a number > 0, not nan"),
        (
            "text.tie_word_embeddings",
            0,
            "spec.text.tie_word_embeddings must be true or false, not 0",
        ),
        ("vision.image_size", None, "spec.vision.image_size must be an integer >= 1, not None"),
        (
            "vision.norm_type",
            "batch_norm",
            "spec.vision.norm_type must be one of 'layer_norm', 'rms_norm', not 'batch_norm'",
        ),
        ("downsample_ratio", 2.0, "spec.downsample_ratio must be a number > 0 and <= 1.0, not 2.0"),
        (
            "downsample_ratio",
            math.inf,
            "spec.downsample_ratio must be a number > 0 and <= 1.0, not inf",
        ),
        ("select_layer", -2, "spec.select_layer must be an integer >= -1, not -2"),
        ("ps_version", "v1", "spec.ps_version must be one of 'v2', not 'v1'"),
        ("template", ["internvl2_5"], "spec.template must be a string, not ['internvl2_5']"),
        ("max_dynamic_patch", 0, "spec.max_dynamic_patch must be an integer >= 1, not 0"),
    ],
)
def test_a_spec_field_of_the_wrong_type_or_range_is_named(spec, path, value, message):
    with pytest.raises(ConfigError) as caught:
        ModelSpec.from_dict(edited(spec, path, value))
    assert str(caught.value) == message


def test_valid_values_pass_unchanged(spec):
    assert ModelSpec.from_dict(spec).to_dict() == spec
    assert ModelSpec.from_dict(edited(spec, "select_layer", -1)).select_layer == -1
    # an integer is a number
    assert ModelSpec.from_dict(edited(spec, "downsample_ratio", 1)).downsample_ratio == 1
    assert dataclasses.astuple(LayerBuild(1, 1, 1)) == (1, 1, 1)


def test_fields_that_must_agree():
    with pytest.raises(
        ConfigError,
        match=r"build.max_prompt_tokens \(300\) exceeds the KV cache "
        r"\(build.kv_cache_len 255\)",
    ):
        LayerBuild(prefill_chunk=16, kv_cache_len=255, max_prompt_tokens=300)
    with pytest.raises(ConfigError, match="build.prefill_chunk must be an integer >= 1, not 0"):
        LayerBuild(prefill_chunk=0)


def test_min_dynamic_patch_above_max_is_refused(spec):
    with pytest.raises(
        ConfigError, match=r"spec.max_dynamic_patch \(2\) is below spec.min_dynamic_patch \(3\)"
    ):
        ModelSpec.from_dict(edited(edited(spec, "min_dynamic_patch", 3), "max_dynamic_patch", 2))


def test_config_json_values_are_checked_as_the_manifest_s(tmp_path):
    hf = make_tiny(tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["vision_config"]["patch_size"] = "fourteen"
    with pytest.raises(ModelDirError, match="config.json: invalid literal for int"):
        ModelSpec.from_hf_config(cfg)
    cfg["vision_config"]["patch_size"] = 0
    with pytest.raises(
        ModelDirError, match="config.json: spec.vision.patch_size must be an integer >= 1, not 0"
    ):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(ModelDirError, match="config.json: "):
        ModelSpec.from_hf_config({"vision_config": [], "llm_config": []})


@pytest.mark.parametrize(
    "body, message",
    [
        ([1], "format None, expected"),
        (
            {"format": "internvl_ros.layers/1", "spec": {}, "build": {}, "files": "decoder.onnx"},
            "files must map each role to a file name",
        ),
        (
            {"format": "internvl_ros.layers/1", "spec": {}, "build": {}, "files": {"vit": 3}},
            "files must map each role to a file name",
        ),
        (
            {
                "format": "internvl_ros.layers/1",
                "spec": {},
                "build": {},
                "files": {"layers": ["a.onnx", [], "c.onnx"]},
            },
            "files must map each role to a file name",
        ),
        (
            {"format": "internvl_ros.layers/1", "spec": [], "build": {}, "files": {}},
            "malformed manifest (TypeError",
        ),
        (
            {
                "format": "internvl_ros.layers/1",
                "spec": "SPEC",
                "build": {"kv_cache_len": 0},
                "files": {},
            },
            "malformed manifest (ConfigError: build.kv_cache_len must be an integer >= 1, not 0)",
        ),
    ],
)
def test_a_malformed_manifest_is_a_model_directory_error(spec, tmp_path, body, message):
    if isinstance(body, dict) and body["spec"] == "SPEC":
        body["spec"] = spec
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(ModelDirError) as caught:
        Manifest.read(tmp_path)
    assert message in str(caught.value) and str(tmp_path / "manifest.json") in str(caught.value)
