"""The DINOv2 / DINOv3 checkpoint formats users have, loaded through ``model.checkpoint_path``: transformers'
(``save_pretrained`` folders and their ``model.safetensors``), Meta's originals, timm's as ``.safetensors``.

Each test writes a small random model in that format and checks that the timm backbone then computes the same
features as the model that wrote it (not only that the names match). transformers' models are built with the
config of timm's ViT-S of the family (hub configs: DINOv2 ``image_size`` 518, DINOv3 4 register tokens); their
q/v biases are zero for DINOv3, as in the released (distilled) checkpoints, which timm's ViT-S has no bias for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

from nnunetv2.model.backbone import (
    BACKBONES,
    BackboneWeightsError,
    create_backbone,
    get_vit_features,
    load_backbone_checkpoint,
)
from nnunetv2.vit.config import build_model, validate_config

ATOL = 1e-4
HF_CONFIGS = {  # timm's ViT-S of each family, in transformers' config classes
    ("dinov3", "small"): lambda: DINOv3ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16,
        num_register_tokens=4, layer_norm_eps=1e-5, rope_theta=100.0),
    # small_plus: SwiGLU MLP (gate/up/down), as huge_plus and 7b
    ("dinov3", "small_plus"): lambda: DINOv3ViTConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16,
        num_register_tokens=4, use_gated_mlp=True, hidden_act="silu"),
    ("dinov2", "small"): lambda: Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14, image_size=518,
        layer_norm_eps=1e-6),
}
INPUT_SIZES = {"dinov3": (64, 96), "dinov2": (518, 518)}  # DINOv2: the hub's native grid, no pos-embed resampling


def _transformers_model(family: str, size: str, seed: int = 0) -> torch.nn.Module:
    """A random transformers model; every tensor perturbed (no init value, e.g. LayerNorm's 1 and 0, left)."""
    torch.manual_seed(seed)
    cls = DINOv3ViTModel if family == "dinov3" else Dinov2Model
    model = cls(HF_CONFIGS[family, size]()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lambda1" in name:
                param.uniform_(0.5, 1.5)  # layer scales of ~1 so that every block changes the tokens
            elif family == "dinov3" and re.search(r"[qv]_proj\.bias", name):
                param.zero_()
            else:
                param.add_(0.02 * torch.randn_like(param))
    return model


class Written:
    """A transformers model saved by ``save_pretrained`` and its outputs on one input."""

    def __init__(self, family: str, size: str, folder: Path) -> None:
        self.family, self.size, self.folder = family, size, folder
        self.model = _transformers_model(family, size)
        self.model.save_pretrained(folder)
        torch.manual_seed(1)
        self.x = torch.randn(1, 3, *INPUT_SIZES[family])
        with torch.no_grad():
            self.tokens = self.model(pixel_values=self.x).last_hidden_state  # after the final norm, prefix first


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache = {}

    def get(family: str, size: str = "small") -> Written:
        if (family, size) not in cache:
            cache[family, size] = Written(family, size, tmp_path_factory.mktemp(f"{family}_{size}"))
        return cache[family, size]

    return get


def assert_same_features(backbone: torch.nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> None:
    """The backbone's last-block patch features (normed, as decoders read them) and CLS equal ``tokens``."""
    backbone.eval()
    depth = len(backbone.blocks)
    with torch.no_grad():
        (spatial,), (cls,) = get_vit_features(backbone, x, [depth - 1], return_cls=True, output_fmt="NLC")
    n_prefix = backbone.num_prefix_tokens
    assert spatial.shape == tokens[:, n_prefix:].shape
    torch.testing.assert_close(spatial, tokens[:, n_prefix:], atol=ATOL, rtol=0)
    torch.testing.assert_close(cls, tokens[:, 0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------- transformers'


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
@pytest.mark.parametrize("given", ["folder", "model.safetensors"])
def test_transformers_checkpoint_gives_transformers_features(written, family, given):
    saved = written(family)
    path = saved.folder if given == "folder" else saved.folder / "model.safetensors"
    backbone, _, _ = create_backbone(family, "small", checkpoint_path=path, pretrained=False)
    assert_same_features(backbone, saved.x, saved.tokens)


def test_config_checkpoint_path_takes_a_transformers_folder(written):
    """``model.checkpoint_path: FOLDER`` in a config: validated, and the built segmentation model's backbone
    computes transformers' features."""
    saved = written("dinov3")
    config = validate_config({"model": {"model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3",
                                        "backbone_size": "small", "checkpoint_path": str(saved.folder)}})
    assert config.model.checkpoint_path == str(saved.folder.resolve())
    model = build_model(config, in_channels=3, num_classes=2, load_weights=True)
    assert_same_features(model.backbone, saved.x, saved.tokens)


def test_transformers_dinov3_swiglu_checkpoint(written):
    """DINOv3's gated MLP (gate/up/down projections) into timm's SwiGLU (small_plus; huge_plus and 7b alike)."""
    saved = written("dinov3", "small_plus")
    backbone, _, _ = create_backbone("dinov3", "small_plus", checkpoint_path=saved.folder, pretrained=False)
    assert_same_features(backbone, saved.x, saved.tokens)


def test_transformers_dinov2_giant_swiglu_checkpoint(tmp_path):
    """DINOv2 giant's packed SwiGLU (``weights_in`` / ``weights_out``): timm's giant with 2 blocks of width 384
    (its SwiGLU hidden size then 1024, as transformers' rounding gives) at a 4x4 token grid."""
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                          image_size=56, use_swiglu_ffn=True)
    hf = Dinov2Model(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(0.02 * torch.randn_like(param))
    hf.save_pretrained(tmp_path)
    assert any(".mlp.weights_in." in key for key in load_file(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        tokens = hf(pixel_values=x).last_hidden_state
    backbone = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, depth=2, embed_dim=384,
                                 num_heads=6, img_size=56, dynamic_img_size=True)
    load_backbone_checkpoint(backbone, tmp_path, BACKBONES["dinov2"])
    assert_same_features(backbone, x, tokens)


def test_sharded_transformers_folder(written, tmp_path):
    """Large models (DINOv3 7B) come as shards with an index: the folder loads as the single file does."""
    saved = written("dinov3")
    saved.model.save_pretrained(tmp_path, max_shard_size="5MB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    backbone, _, _ = create_backbone("dinov3", "small", checkpoint_path=tmp_path, pretrained=False)
    assert_same_features(backbone, saved.x, saved.tokens)


def test_dinov3_nonzero_qv_bias_is_refused(written, tmp_path):
    """timm's DINOv3 ViT-S has no q/v bias: a file with a non-zero one is refused, not loaded without it."""
    state_dict = load_file(written("dinov3").folder / "model.safetensors")
    state_dict["layer.3.attention.q_proj.bias"] = torch.full((384,), 0.1)
    path = tmp_path / "model.safetensors"
    save_file(state_dict, path)
    with pytest.raises(BackboneWeightsError, match=r"blocks\.3\.attn\.qkv\.bias holds non-zero") as err:
        create_backbone("dinov3", "small", checkpoint_path=path, pretrained=False)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------------ Meta's

# Meta's names, as the state_dict of the dinov3 / dinov2 repositories' ViT-S modules (hub: load_state_dict strict).
META_DINOV3_TOP = {"cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                   "rope_embed.periods", "norm.weight", "norm.bias"}
META_DINOV3_BLOCK = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.qkv.bias_mask",
                     "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                     "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma"}
META_DINOV2_TOP = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                   "norm.weight", "norm.bias"}
META_DINOV2_BLOCK = META_DINOV3_BLOCK - {"attn.qkv.bias_mask"}


def _meta_layout(hf: torch.nn.Module, family: str) -> dict:
    """transformers' weights written in Meta's names, by hand (independent of the loader's own renaming)."""
    sd = hf.state_dict()  # transformers 5 module names
    dim = hf.config.hidden_size
    prefix = "model.layer" if family == "dinov3" else "encoder.layer"
    patch = "embeddings.patch_embeddings" + ("" if family == "dinov3" else ".projection")
    out = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"].reshape(1, dim),
           "patch_embed.proj.weight": sd[f"{patch}.weight"], "patch_embed.proj.bias": sd[f"{patch}.bias"],
           "norm.weight": sd["norm.weight" if family == "dinov3" else "layernorm.weight"],
           "norm.bias": sd["norm.bias" if family == "dinov3" else "layernorm.bias"]}
    if family == "dinov3":
        out["storage_tokens"] = sd["embeddings.register_tokens"]
        out["rope_embed.periods"] = torch.rand(dim // hf.config.num_attention_heads // 4)
    else:
        out["pos_embed"] = sd["embeddings.position_embeddings"]
    for i in range(hf.config.num_hidden_layers):
        src, dst = f"{prefix}.{i}.", f"blocks.{i}."
        att = src + "attention."
        zeros = torch.zeros(dim)
        out[dst + "attn.qkv.weight"] = torch.cat([sd[att + f"{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.qkv.bias"] = torch.cat([sd.get(att + f"{p}_proj.bias", zeros) for p in "qkv"])
        if family == "dinov3":
            out[dst + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), zeros, torch.ones(dim)])
        fc1, fc2 = ("up_proj", "down_proj") if family == "dinov3" else ("fc1", "fc2")
        for meta, ours in [("norm1", "norm1"), ("attn.proj", "attention.o_proj"), ("norm2", "norm2"),
                           ("mlp.fc1", f"mlp.{fc1}"), ("mlp.fc2", f"mlp.{fc2}")]:
            out[f"{dst}{meta}.weight"], out[f"{dst}{meta}.bias"] = sd[f"{src}{ours}.weight"], sd[f"{src}{ours}.bias"]
        for n in (1, 2):
            out[f"{dst}ls{n}.gamma"] = sd[f"{src}layer_scale{n}.lambda1"]
    return out


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_meta_original_checkpoint_gives_same_features(written, family, tmp_path):
    saved = written(family)
    meta = _meta_layout(saved.model, family)
    top, block = (META_DINOV3_TOP, META_DINOV3_BLOCK) if family == "dinov3" else (META_DINOV2_TOP, META_DINOV2_BLOCK)
    assert set(meta) == top | {f"blocks.{i}.{name}" for i in range(12) for name in block}
    path = tmp_path / f"{family}_vits_pretrain.pth"
    torch.save(meta, path)
    backbone, _, _ = create_backbone(family, "small", checkpoint_path=path, pretrained=False)
    assert_same_features(backbone, saved.x, saved.tokens)


# ------------------------------------------------------------------------------------------------- timm's


@pytest.mark.parametrize("family", ["dinov3", "dinov2"])
def test_timm_safetensors_checkpoint(family, tmp_path):
    torch.manual_seed(0)
    timm_name = BACKBONES[family].timm_name.format(size="small")
    source = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    state_dict = {k: v + 0.01 * torch.randn_like(v) for k, v in source.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state_dict, path)
    backbone, _, _ = create_backbone(family, "small", checkpoint_path=path, pretrained=False)
    loaded = backbone.state_dict()
    assert all(torch.equal(loaded[k], state_dict[k]) for k in loaded)


# ---------------------------------------------------------------------------------------------- refusals


def test_unknown_format_lists_known_formats_and_first_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"vision_model.encoder.layers.0.weight": torch.zeros(4), "vision_model.embed.weight": torch.zeros(2)},
              path)
    with pytest.raises(BackboneWeightsError) as err:
        create_backbone("dinov2", "small", checkpoint_path=path, pretrained=False)
    message = str(err.value)
    assert str(path) in message and "no format known" in message
    for known in BACKBONES["dinov2"].formats:
        assert known in message
    assert "vision_model.embed.weight" in message
    assert "backbone_size" not in message


@pytest.mark.parametrize("source,target,model_type",
                         [("dinov3", "dinov2", "dinov3_vit"), ("dinov2", "dinov3", "dinov2")])
def test_transformers_folder_of_the_other_family_is_refused(written, source, target, model_type):
    """A transformers folder of the sibling family: refused, with what config.json says the folder holds."""
    with pytest.raises(BackboneWeightsError) as err:
        create_backbone(target, "small", checkpoint_path=written(source).folder, pretrained=False)
    message = str(err.value)
    assert f"the config.json beside it says model_type '{model_type}'" in message
    assert "model.backbone" in message or "no format known" in message
    assert "model.backbone_size" not in message


def test_dinov2_with_registers_is_refused(tmp_path):
    """Meta's dinov2_vits14_reg4 layout: all but the position embedding would match; refused, not half loaded."""
    torch.manual_seed(0)
    state_dict = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0).state_dict()
    state_dict.update(register_tokens=torch.randn(1, 4, 384), mask_token=torch.zeros(1, 384))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(state_dict, path)
    with pytest.raises(BackboneWeightsError, match="DINOv2 with registers") as err:
        create_backbone("dinov2", "small", checkpoint_path=path, pretrained=False)
    assert str(path) in str(err.value)


def test_truncated_safetensors_names_the_file(written, tmp_path):
    data = (written("dinov3").folder / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BackboneWeightsError, match="corrupt or truncated") as err:
        create_backbone("dinov3", "small", checkpoint_path=path, pretrained=False)
    assert str(path) in str(err.value)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(BackboneWeightsError) as err:
        create_backbone("dinov2", "small", checkpoint_path=tmp_path, pretrained=False)
    assert f"{tmp_path} holds no model.safetensors" in str(err.value)
    assert "config.json" in str(err.value)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    """A ViT-B file (transformers' DINOv3 names and shapes, zeros: only they matter) for backbone_size small."""
    config = DINOv3ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             num_register_tokens=4)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DINOv3ViTModel(config).state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path)
    with pytest.raises(BackboneWeightsError) as err:
        create_backbone("dinov3", "small", checkpoint_path=path, pretrained=False)
    message = str(err.value)
    assert "another size" in message and "model.backbone_size" in message
    assert "(768, 3, 16, 16) in the file, (384, 3, 16, 16)" in message
