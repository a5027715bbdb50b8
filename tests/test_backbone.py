"""Tests for nnunetv2/model/backbone.py: the backbone registry, checkpoint formats, feature extraction.

Checkpoints are written by the tests from randomly initialised timm ViT-S models (no hub access).
Checkpoint-only families (RETFound ViT-L, VisionFM ViT-B) are tested on a ViT-S/16 of the same timm
architecture by swapping their registry row: the loading code is the same, the files 4-14x smaller.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

import pytest
import timm
import torch

from nnunetv2.model import backbone as backbone_module
from nnunetv2.model.backbone import (
    BACKBONES,
    BackboneWeightsError,
    ProgressiveUpsampler,
    create_backbone,
    feature_indices_for_depth,
    get_vit_features,
)

TIMM_NAMES = {
    "dinov3": "vit_small_patch16_dinov3",
    "dinov2": "vit_small_patch14_dinov2",
    "vit16": "vit_small_patch16_224",  # architecture of RETFound (large) / VisionFM (base), small here
}
CHECKED_KEYS = ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight")


def _layer_scales_to_one(model: torch.nn.Module) -> None:
    """Random-init layer scales are ~1e-5: blocks would barely change the tokens and hide index mix-ups."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gamma" in name:
                param.fill_(1.0)


@pytest.fixture(scope="module")
def sources():
    """timm-native state dicts of random ViT-S models; every tensor perturbed so none equals its init."""
    torch.manual_seed(1)
    out = {}
    for key, timm_name in TIMM_NAMES.items():
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
        out[key] = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def files(sources, tmp_path_factory):
    """timm-native checkpoint files, written once."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for key in ("dinov3", "dinov2"):
        paths[key] = folder / f"{key}_small_timm.pth"
        torch.save(sources[key], paths[key])
    return paths


@pytest.fixture
def small_checkpoint_families(monkeypatch):
    """RETFound and VisionFM rows on a ViT-S/16 (same timm class, filter, wrapper keys, dropped prefixes)."""
    for name in ("retfound", "visionfm"):
        small = dataclasses.replace(BACKBONES[name], timm_name="vit_{size}_patch16_224", sizes=("small",))
        monkeypatch.setitem(backbone_module.BACKBONES, name, small)


def load(name: str, path: Path, **kwargs) -> torch.nn.Module:
    model, _, _ = create_backbone(name, "small", checkpoint_path=path, pretrained=False, **kwargs)
    return model


def assert_loaded(model: torch.nn.Module, source: dict) -> None:
    loaded = model.state_dict()
    for key in CHECKED_KEYS:
        assert torch.equal(loaded[key], source[key]), key
    differing = [k for k, v in loaded.items() if not torch.equal(v, source[k])]
    assert not differing, f"tensors not loaded from the checkpoint: {differing[:10]}"


# ------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    "depth,indices",
    [(12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]), (32, [7, 15, 23, 31]), (40, [9, 19, 29, 39])],
)
def test_feature_indices_for_depth(depth, indices):
    assert feature_indices_for_depth(depth) == indices


def test_feature_indices_need_four_blocks():
    with pytest.raises(ValueError):
        feature_indices_for_depth(3)


@pytest.mark.parametrize("name,patch", [("dinov3", 16), ("dinov2", 14)])
def test_create_backbone_returns_module_patch_and_timm_name(name, patch):
    model, patch_size, timm_name = create_backbone(name, "small", pretrained=False)
    assert patch_size == patch
    assert timm_name == TIMM_NAMES[name]
    assert isinstance(model, torch.nn.Module)
    assert len(model.blocks) == 12 and model.embed_dim == 384
    assert model.patch_embed.proj.weight.shape[-2:] == (patch, patch)
    assert all(block.attn.fused_attn for block in model.blocks)  # F.scaled_dot_product_attention kernels


def test_unknown_backbone_lists_valid_options():
    with pytest.raises(ValueError, match="sam") as err:
        create_backbone("sam", "small", pretrained=False)
    for name in ("dinov3", "dinov2", "retfound", "visionfm"):
        assert name in str(err.value)


def test_unknown_size_lists_valid_options():
    with pytest.raises(ValueError, match="tiny") as err:
        create_backbone("dinov3", "tiny", pretrained=False)
    for size in BACKBONES["dinov3"].sizes:
        assert size in str(err.value)
    with pytest.raises(ValueError, match="large"):
        create_backbone("retfound", "small", pretrained=False)


@pytest.mark.parametrize("name,size", [("retfound", "large"), ("visionfm", "base")])
def test_checkpoint_only_family_without_checkpoint(name, size):
    with pytest.raises(BackboneWeightsError) as err:
        create_backbone(name, size, pretrained=True)
    assert "checkpoint_path" in str(err.value)
    assert "pretrained: false" in str(err.value)


def test_download_failure_offline_is_clear(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    with pytest.raises(RuntimeError) as err:
        create_backbone("dinov3", "small", pretrained=True)
    assert "checkpoint_path" in str(err.value)
    assert "vit_small_patch16_dinov3" in str(err.value)


# --------------------------------------------------------------------------- checkpoint formats


@pytest.mark.parametrize("name", ["dinov3", "dinov2"])
def test_load_timm_native_checkpoint(name, sources, files):
    assert_loaded(load(name, files[name]), sources[name])


def test_load_ddp_wrapped_checkpoint(sources, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sources["dinov2"].items()}, "epoch": 3}, path)
    assert_loaded(load("dinov2", path), sources["dinov2"])


def test_load_retfound_mae_checkpoint(sources, tmp_path, small_checkpoint_families, caplog):
    state_dict = dict(sources["vit16"])
    state_dict.update({
        "mask_token": torch.randn(1, 1, 512),
        "decoder_embed.weight": torch.randn(512, 384),
        "decoder_embed.bias": torch.randn(512),
        "decoder_pos_embed": torch.randn(1, 197, 512),
        "decoder_blocks.0.norm1.weight": torch.randn(512),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(1536, 512),
        "decoder_norm.weight": torch.randn(512),
        "decoder_pred.weight": torch.randn(768, 512),
        "decoder_pred.bias": torch.randn(768),
    })
    path = tmp_path / "RETFound_mae_natureCFP.pth"
    # The pickled argparse namespace makes weights_only loading fail, as in the real RETFound files.
    args = argparse.Namespace(model="mae_vit_large_patch16", norm_pix_loss=True)
    torch.save({"model": state_dict, "args": args}, path)
    with caplog.at_level(logging.INFO, logger=backbone_module.__name__):
        model = load("retfound", path)
    assert_loaded(model, sources["vit16"])
    assert re.search(rf"{len(sources['vit16'])} tensors matched, 0 missing, 0 unexpected", caplog.text)


def test_load_visionfm_teacher_checkpoint(sources, tmp_path, small_checkpoint_families):
    teacher = {"module.backbone." + k: v for k, v in sources["vit16"].items()}
    teacher["module.backbone.masked_embed"] = torch.randn(1, 384)
    teacher["module.head.mlp.0.weight"] = torch.randn(2048, 384)
    teacher["module.head.last_layer.weight_g"] = torch.randn(65536, 1)
    student = {"module.backbone." + k: -v for k, v in sources["vit16"].items()}
    path = tmp_path / "VFM_Fundus_weights.pth"
    args = argparse.Namespace(arch="vit_base")
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": args}, path)
    assert_loaded(load("visionfm", path), sources["vit16"])


def test_load_meta_original_dinov3_checkpoint(sources, tmp_path):
    """Meta's own DINOv3 layout, converted by timm's eva checkpoint filter (invert it here)."""
    source = sources["dinov3"]
    original = {}
    for key, value in source.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        original[key] = value
    for i in range(12):
        original[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * 384)  # ViT-S/16 in timm has no qkv bias
        original[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * 384)
    original["rope_embed.periods"] = torch.rand(16)
    original["mask_token"] = torch.randn(1, 384)
    assert "storage_tokens" in original and "blocks.0.ls1.gamma" in original
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(original, path)
    model = load("dinov3", path)
    assert_loaded(model, source)
    assert torch.equal(model.reg_token, source["reg_token"])
    assert torch.equal(model.blocks[3].gamma_2, source["blocks.3.gamma_2"])


def test_single_channel_adapts_patch_embedding(sources, files):
    model = load("dinov3", files["dinov3"], in_channels=1)
    weight = model.patch_embed.proj.weight
    source = sources["dinov3"]["patch_embed.proj.weight"]
    assert weight.shape == (384, 1, 16, 16)
    torch.testing.assert_close(weight, source.sum(dim=1, keepdim=True))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sources["dinov3"]["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        assert get_vit_features(model.eval(), torch.randn(1, 1, 32, 48), [11])[0].shape == (1, 384, 2, 3)


def test_loading_logs_matched_missing_unexpected(sources, tmp_path, caplog):
    state_dict = dict(sources["dinov3"])
    del state_dict["norm.weight"], state_dict["norm.bias"]
    state_dict["cls_token"] = torch.randn(1, 1, 10)  # wrong shape
    state_dict["some_extra.weight"] = torch.randn(4)  # unknown
    path = tmp_path / "partial.pth"
    torch.save(state_dict, path)
    with caplog.at_level(logging.INFO, logger=backbone_module.__name__):
        model = load("dinov3", path)
    n = len(sources["dinov3"])
    assert f"{path}: {n - 3} tensors matched, 3 missing, 1 unexpected, 1 with wrong shape" in caplog.text
    assert re.search(r"Missing \(left at initialisation\): cls_token, norm\.bias, norm\.weight", caplog.text)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sources["dinov3"]["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("source,target", [("dinov2", "dinov3"), ("dinov3", "dinov2")])
def test_checkpoint_of_another_family_is_refused(source, target, files):
    with pytest.raises(BackboneWeightsError) as err:
        load(target, files[source])
    assert str(files[source]) in str(err.value)
    assert "check that model.backbone names the model this file holds" in str(err.value).lower()
    assert "model.backbone_size" not in str(err.value)


def test_checkpoint_with_unknown_keys_is_refused(tmp_path):
    path = tmp_path / "random_keys.pth"
    torch.save({"encoder.layer1.weight": torch.randn(8, 8), "foo": torch.randn(3)}, path)
    with pytest.raises(BackboneWeightsError) as err:
        load("dinov3", path)
    assert str(path) in str(err.value)


def test_truncated_checkpoint_names_the_file(files, tmp_path):
    data = files["dinov2"].read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as err:
        load("dinov2", path)
    assert str(path) in str(err.value)


def test_garbage_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "garbage.pth"
    noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path.write_bytes(noise.numpy().tobytes())
    with pytest.raises(RuntimeError) as err:
        load("dinov3", path)
    assert str(path) in str(err.value)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(BackboneWeightsError, match="checkpoint_path"):
        load("dinov3", tmp_path / "does_not_exist.pth")


# ----------------------------------------------------------------------------------- features


@pytest.mark.parametrize("name,size,n_prefix", [("dinov3", (64, 96), 5), ("dinov2", (56, 84), 1)])
def test_get_vit_features(name, size, n_prefix):
    model, patch, _ = create_backbone(name, "small", pretrained=False)
    model.eval()
    _layer_scales_to_one(model)
    assert model.num_prefix_tokens == n_prefix  # dinov3: CLS + 4 registers
    indices = [2, 5, 8, 11]
    x = torch.randn(2, 3, *size)
    grid = (size[0] // patch, size[1] // patch)

    block_outputs = {}
    hooks = [
        model.blocks[i].register_forward_hook(lambda mod, args, out, i=i: block_outputs.__setitem__(i, out))
        for i in indices
    ]
    try:
        with torch.no_grad():
            maps, cls_tokens = get_vit_features(model, x, indices, return_cls=True)
            plain = get_vit_features(model, x, indices)
            tokens = get_vit_features(model, x, indices, output_fmt="NLC")
    finally:
        for hook in hooks:
            hook.remove()

    assert len(maps) == len(cls_tokens) == len(plain) == len(tokens) == 4
    for level, i in enumerate(indices):
        normed = model.norm(block_outputs[i])
        expected_map = normed[:, n_prefix:].transpose(1, 2).reshape(2, 384, *grid)
        assert maps[level].shape == (2, 384, *grid)
        torch.testing.assert_close(maps[level], expected_map)
        torch.testing.assert_close(plain[level], maps[level])
        assert tokens[level].shape == (2, grid[0] * grid[1], 384)
        torch.testing.assert_close(tokens[level], normed[:, n_prefix:])
        assert cls_tokens[level].shape == (2, 384)
        torch.testing.assert_close(cls_tokens[level], normed[:, 0])
    # the levels really are different blocks
    assert not torch.allclose(maps[0], maps[3], atol=1e-3)


# ---------------------------------------------------------------------------------- upsampler


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_progressive_upsampler_shapes(scale):
    module = ProgressiveUpsampler(384, 96, scale)
    out = module(torch.randn(1, 384, 7, 7))
    assert out.shape == (1, 96, 7 * scale, 7 * scale)
    n_stages = sum(isinstance(m, torch.nn.ConvTranspose2d) for m in module.modules())
    assert 2**n_stages == scale


@pytest.mark.parametrize("scale", [0, 1, 3, 6])
def test_progressive_upsampler_rejects_non_power_of_two(scale):
    with pytest.raises(ValueError, match="power of two"):
        ProgressiveUpsampler(384, 96, scale)
