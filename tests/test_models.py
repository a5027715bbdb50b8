"""Tests for the ViT segmentation models (nnunetv2/model): shapes, gradients, LoRA, factory contract.

CPU only, random ViT-S backbones (pretrained=False), small inputs; every model is built once per
module (module-scoped fixtures) to keep the suite fast.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from nnunetv2.model import model_dpt, model_primus, model_segformer, model_upernet
from nnunetv2.model.common import pad_to_multiple
from nnunetv2.model.config import LoraSettings
from nnunetv2.model.detail import DETAIL_STRIDES

NUM_CLASSES = 3

# name -> (module, decoder kwargs); narrow decoders keep CPU time down (widths do not change shapes)
VARIANTS = {
    "dpt": (model_dpt, {"fusion_hidden_size": 64}),
    "upernet": (model_upernet, {"hidden_size": 64}),
    "segformer": (model_segformer, {"decoder_hidden_size": 64}),
    "primus": (model_primus, {}),
    "primus_ms": (model_primus, {"multi_scale": True}),
    # the same decoders ending in the high-resolution detail path
    "dpt_detail": (model_dpt, {"fusion_hidden_size": 64, "detail_path": True}),
    "upernet_detail": (model_upernet, {"hidden_size": 64, "detail_path": True}),
    "segformer_detail": (model_segformer, {"decoder_hidden_size": 64, "detail_path": True}),
    "primus_detail": (model_primus, {"detail_path": True, "detail_channels": [8, 16, 24]}),
}
BACKBONES = ("dinov3", "dinov2")
PATCH = {"dinov3": 16, "dinov2": 14}
CASES = [(variant, backbone) for backbone in BACKBONES for variant in VARIANTS]
CASE_IDS = [f"{variant}-{backbone}" for variant, backbone in CASES]

FIXED_KEYWORDS = [
    "backbone_name", "backbone_size", "num_classes", "checkpoint_path", "freeze_backbone", "use_lora",
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "pretrained", "in_channels", "trust_checkpoint",
    "drop_path_rate",
]
DECODER_KEYWORDS = {
    model_dpt: [
        "fusion_hidden_size", "readout_type", "neck_hidden_sizes", "use_batch_norm_in_fusion_residual", "dropout",
    ],
    model_upernet: ["hidden_size", "pool_scales", "pyramid_channels"],
    model_segformer: ["decoder_hidden_size", "pyramid_channels", "dropout"],
    model_primus: ["multi_scale"],
}


def build(variant: str, backbone: str, default_decoder: bool = False, **kwargs):
    module, decoder_kwargs = VARIANTS[variant]
    if default_decoder:
        decoder_kwargs = {k: v for k, v in decoder_kwargs.items() if k in ("multi_scale", "detail_path")}
    kwargs = {"num_classes": NUM_CLASSES, "pretrained": False, **decoder_kwargs, **kwargs}
    torch.manual_seed(0)  # a module-scoped model is built before the test's own seed: the same whatever ran before
    return module.create_segmentation_model(backbone, "small", **kwargs)


def assert_all_trainable_have_grads(model) -> None:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "model has no trainable parameters"
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"{len(no_grad)} trainable parameters got no gradient, e.g. {no_grad[:5]}"
    not_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradients: {not_finite[:5]}"


def train_step(model, x: torch.Tensor) -> torch.Tensor:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().pow(2).mean().backward()
    return out


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def case(request):
    """(variant, backbone, model) built once per module, left in eval mode with no gradients."""
    variant, backbone = request.param
    model = build(variant, backbone).eval()
    yield variant, backbone, model


@pytest.fixture(autouse=True)
def _reset_models(request):
    """Tests share module-scoped models: give them back in eval mode, no grads, no checkpointing, and with the
    BatchNorm statistics they had (a training-mode forward changes them), so no test depends on the ones before."""
    models = [request.getfixturevalue(name)[2] for name in ("case", "lora_case") if name in request.fixturenames]
    buffers = [{name: buffer.clone() for name, buffer in model.named_buffers()} for model in models]
    yield
    for model, saved in zip(models, buffers):
        model.set_grad_checkpointing(False)
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


# --------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "batch,height,width", [(1, 224, 224), (1, 256, 320), (1, 237, 189)], ids=["224x224", "256x320", "237x189"]
)
def test_output_shape_and_finite(case, batch, height, width):
    _, _, model = case
    with torch.no_grad():
        out = model(torch.randn(batch, 3, height, width))
    assert out.shape == (batch, NUM_CLASSES, height, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant,backbone", CASES, ids=CASE_IDS)
def test_single_channel_input(variant, backbone):
    model = build(variant, backbone, in_channels=1).eval()
    assert model.vit.patch_embed.proj.weight.shape[1] == 1
    with torch.no_grad():
        out = model(torch.randn(1, 1, 70, 90))
    assert out.shape == (1, NUM_CLASSES, 70, 90)
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError):  # a 3-channel image must not be silently accepted
        with torch.no_grad():
            model(torch.randn(1, 3, 70, 90))


def test_feature_indices(case):
    _, _, model = case
    assert model.feature_indices == [2, 5, 8, 11]
    assert len(model.vit.blocks) == 12
    assert model.patch_size == PATCH[case[1]]


# ------------------------------------------------------------------------------------ gradients


def test_every_trainable_parameter_gets_a_gradient(case):
    """DDP without find_unused_parameters needs a gradient on every trainable parameter."""
    _, _, model = case
    out = train_step(model, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, NUM_CLASSES, 64, 64)
    assert_all_trainable_have_grads(model)


@pytest.mark.parametrize("variant,backbone", [("dpt", "dinov3"), ("upernet", "dinov2")],
                         ids=["dpt-dinov3", "upernet-dinov2"])
def test_grad_checkpointing_same_outputs_and_gradients(variant, backbone):
    """Checkpointing lives in the backbone (one decoder per backbone is enough; the LoRA tests run
    every model with it on): same outputs and gradients, block 0 recomputed in backward."""
    model = build(variant, backbone).eval()
    x = torch.randn(1, 3, 48, 64)
    calls = []
    # a pre-hook: non-reentrant checkpointing stops recomputing early, so forward hooks may not fire
    hook = model.vit.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        model.zero_grad(set_to_none=True)
        ref = model(x)
        ref.pow(2).mean().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert len(calls) == 1

        calls.clear()
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(True)
        out = model(x)
        out.pow(2).mean().backward()
    finally:
        hook.remove()
    assert len(calls) == 2, "block 0 was not recomputed in backward: checkpointing is not active"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert_all_trainable_have_grads(model)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------- summaries


def _parse_components(text: str):
    rows = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\S+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)%", line.strip())
        if match:
            rows[match[1]] = (int(match[2].replace(",", "")), int(match[3].replace(",", "")))
    return rows


# ViT-S/16 backbones as create_backbone keeps them (no classifier head, no pooling norm).
VIT_S_PARAMS = {"dinov3": 21_586_944, "dinov2": 22_056_192}
# LoRA rank 8 on the 12 qkv projections (384 -> 1152): A (8 x 384) and B (1152 x 8) per block.
VIT_S_LORA_R8_PARAMS = 12 * 8 * (384 + 1152)


def test_print_trainable_parameters(case, capsys):
    _, _, model = case
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.print_trainable_parameters(detailed=True)
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == model.parameter_summary(detailed=True)
    assert re.search(rf"Total parameters:\s+{total:,}\b", printed)
    assert re.search(rf"Trainable parameters:\s+{trainable:,}\b", printed)
    components = _parse_components(printed)
    assert components["backbone"] == (VIT_S_PARAMS[case[1]], VIT_S_PARAMS[case[1]])
    decoder_parts = {name for name, child in model.named_children() if name != "backbone"
                     and any(True for _ in child.parameters())}
    assert set(components) == {"backbone"} | decoder_parts  # one row per part, every part listed
    assert sum(t for t, _ in components.values()) == trainable and sum(n for _, n in components.values()) == total
    # The short form has the totals but no per-component table.
    short = model.parameter_summary()
    assert f"{total:,}" in short and not _parse_components(short)


# ------------------------------------------------------------------------------------- factory


@pytest.mark.parametrize("module", list(DECODER_KEYWORDS), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_factory_signature(module):
    params = inspect.signature(module.create_segmentation_model).parameters
    names = list(params)
    assert names[: len(FIXED_KEYWORDS)] == FIXED_KEYWORDS
    # then the typed LoRA settings and decoder options (the YAML's lora and model.decoder), and the decoder's options
    assert names[len(FIXED_KEYWORDS):] == (["lora", "decoder"] + DECODER_KEYWORDS[module]
                                           + ["detail_path", "detail_channels"])
    defaults = {name: params[name].default for name in FIXED_KEYWORDS[3:]}
    assert defaults == {
        "checkpoint_path": None, "freeze_backbone": False, "use_lora": False, "lora_rank": 8, "lora_alpha": 16.0,
        "lora_dropout": 0.05, "lora_target_modules": None, "pretrained": True, "in_channels": 3,
        "trust_checkpoint": False, "drop_path_rate": 0.0,
    }
    with pytest.raises(TypeError):
        module.create_segmentation_model("dinov3", "small", num_classes=2, pretrained=False, not_an_option=1)
    with pytest.raises(TypeError, match="not both"):  # LoRA given twice: neither silently wins
        module.create_segmentation_model("dinov3", "small", 2, lora_rank=4, lora=LoraSettings(enabled=True))
    config_class = module.create_segmentation_model.config_class
    with pytest.raises(TypeError, match="not both"):  # the decoder given twice, likewise
        module.create_segmentation_model("dinov3", "small", 2, decoder=config_class(), detail_path=True)
    with pytest.raises(TypeError, match=f"must be a {config_class.__name__}"):  # another decoder's options
        module.create_segmentation_model("dinov3", "small", 2, decoder=object())


@pytest.mark.parametrize("module", list(DECODER_KEYWORDS), ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_factory_takes_the_typed_decoder_config_as_it_is(module):
    config = module.create_segmentation_model.config_class(detail_path=True)
    model = module.create_segmentation_model("dinov3", "small", 2, pretrained=False, decoder=config)
    assert model.decoder_config is config and model.detail is not None


def test_factory_accepts_positional_backbone_arguments():
    model = model_primus.create_segmentation_model("dinov2", "small", 5, None, True, pretrained=False)
    assert model.num_classes == 5 and model.patch_size == 14
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize(
    "module,kwargs",
    [
        (model_dpt, {"readout_type": "foo"}),
        (model_dpt, {"neck_hidden_sizes": [96, 192, 384]}),
        (model_upernet, {"pyramid_channels": [96, 192, 384]}),
        (model_segformer, {"pyramid_channels": [96, 192, 384, 384, 384]}),
        (model_primus, {"num_classes": 0}),
        (model_dpt, {"detail_path": True, "detail_channels": [16, 32]}),
        (model_upernet, {"detail_path": True, "detail_channels": [16, 0, 32]}),
        (model_segformer, {"detail_channels": [16, 32, 64]}),
    ],
    ids=["dpt-readout", "dpt-neck-sizes", "upernet-pyramid", "segformer-pyramid", "num-classes-0",
         "detail-two-levels", "detail-zero-width", "detail-channels-without-path"],
)
def test_bad_options_raise_value_error(module, kwargs):
    kwargs = {"num_classes": 2, "pretrained": False, **kwargs}
    with pytest.raises(ValueError):
        module.create_segmentation_model("dinov3", "small", **kwargs)


def test_decoder_options_are_applied():
    model = model_dpt.create_segmentation_model(
        "dinov3", "small", num_classes=2, pretrained=False, neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64,
        readout_type="add",
    )
    assert model.config.neck_hidden_sizes == [48, 96, 192, 384]
    assert model.config.fusion_hidden_size == 64
    # the DPT plan's public attributes, read-only views of the config
    assert (model.fusion_hidden_size, model.readout_type, model.backbone_patch_size) == (64, "add", 16)
    assert (model.num_classes, model.embed_dim, model.feature_indices) == (2, 384, [2, 5, 8, 11])
    with pytest.raises(AttributeError):
        model.fusion_hidden_size = 128
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


# --------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("variant,backbone", CASES, ids=CASE_IDS)
def test_freeze_backbone(variant, backbone):
    """Every decoder reads a frozen backbone without autograd: no saved activations, no gradients; every decoder
    parameter still gets a gradient (DDP without find_unused_parameters)."""
    model = build(variant, backbone, freeze_backbone=True).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    decoder = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert decoder and all(p.requires_grad for p in decoder)
    saved, size = [], 4 * PATCH[backbone]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        features = model.backbone_features(torch.randn(2, 3, size, size), model.feature_indices)
    assert not saved and all(f.grad_fn is None for f in features)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in decoder)


# ----------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module", params=CASES, ids=CASE_IDS)
def lora_case(request):
    variant, backbone = request.param
    model = build(variant, backbone, use_lora=True).eval()
    yield variant, backbone, model


def test_lora_trainable_parameters(lora_case):
    _, backbone_name, model = lora_case
    components = _parse_components(model.parameter_summary(detailed=True))
    assert components["backbone"] == (VIT_S_LORA_R8_PARAMS, VIT_S_PARAMS[backbone_name] + VIT_S_LORA_R8_PARAMS)
    backbone = list(model.backbone.named_parameters())
    n_trainable = sum(p.numel() for _, p in backbone if p.requires_grad)
    n_total = sum(p.numel() for _, p in backbone)
    assert 0 < n_trainable < 0.05 * n_total
    assert all("lora_" in n for n, p in backbone if p.requires_grad)
    decoder = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.")]
    assert decoder and all(p.requires_grad for _, p in decoder), [n for n, p in decoder if not p.requires_grad]


def test_lora_targets_qkv_by_default(lora_case):
    _, _, model = lora_case
    assert set(model.backbone.peft_config["default"].target_modules) == {"qkv"}
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.backbone.named_modules() if n.endswith(".lora_A")}
    assert len(adapted) == len(model.vit.blocks)
    assert all(n.endswith("attn.qkv") for n in adapted)


def test_lora_gradients_reach_adapters_and_decoder(lora_case):
    _, _, model = lora_case
    model.set_grad_checkpointing(True)
    train_step(model, torch.randn(2, 3, 64, 64))
    assert_all_trainable_have_grads(model)
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)


@pytest.mark.parametrize("variant,backbone", CASES, ids=CASE_IDS)
def test_lora_merge_keeps_outputs(variant, backbone):
    from peft import PeftModel

    model = build(variant, backbone, use_lora=True).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # peft's zero init: merge would be a no-op
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.05)
        # Random-init layer scales are ~1e-5 and would hide what the attention blocks (and LoRA) do.
        for name, p in model.backbone.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
    x = torch.randn(1, 3, 64, 48)
    aligned = pad_to_multiple(x, model.patch_size * model.token_grid_multiple)
    with torch.no_grad():
        out_lora, head_lora = model(x), model.decode_features(aligned)
        with model.backbone.disable_adapter():
            head_base = model.decode_features(aligned)  # the decoder's features
    assert not torch.allclose(head_lora, head_base, atol=1e-3), "perturbed LoRA weights do not change the output"

    model.disable_lora()
    with torch.no_grad():
        out_merged, head_merged = model(x), model.decode_features(aligned)
    torch.testing.assert_close(head_merged, head_lora, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_merged, out_lora, atol=1e-5, rtol=1e-4)
    assert not isinstance(model.backbone, PeftModel)
    assert model.vit is model.backbone
    assert not [type(m) for m in model.modules() if type(m).__module__.startswith("peft")]
    assert not [n for n in model.state_dict() if "lora_" in n or "base_layer" in n]
    assert "blocks.0.attn.qkv.weight" in model.backbone.state_dict()


def test_lora_custom_targets_and_errors():
    model = build("primus", "dinov3", use_lora=True, lora_target_modules=["fc1", "proj"], lora_rank=4)
    adapted = sorted({n.rsplit(".", 2)[-2] for n, _ in model.backbone.named_modules() if n.endswith(".lora_A")})
    assert adapted == ["fc1", "proj"]
    assert model.backbone.peft_config["default"].r == 4
    with pytest.raises(RuntimeError):
        model.enable_lora()
    with pytest.raises(ValueError, match="target_modules"):
        build("primus", "dinov3", use_lora=True, lora_target_modules=["no_such_layer"])


# ---------------------------------------------------------------------- padding and geometry


def test_pad_to_multiple():
    x = torch.randn(1, 2, 237, 189)
    padded = pad_to_multiple(x, 14)
    assert padded.shape == (1, 2, 238, 196)
    assert torch.equal(padded[..., :237, :189], x)
    # reflect padding at the bottom/right: row 237 mirrors row 235, column 189 mirrors column 187
    assert torch.equal(padded[..., 237, :189], x[..., 235, :])
    assert torch.equal(padded[..., :237, 189], x[..., :, 187])

    aligned = torch.randn(1, 3, 224, 224)
    assert torch.equal(pad_to_multiple(aligned, 14), aligned)

    tiny = torch.randn(1, 1, 5, 30)  # smaller than the pad: replicate
    padded = pad_to_multiple(tiny, 14)
    assert padded.shape == (1, 1, 14, 42)
    assert torch.equal(padded[..., 5:, :30], tiny[..., 4:5, :].expand(-1, -1, 9, -1))


@pytest.mark.parametrize("height,width", [(224, 224), (237, 189)])
def test_forward_geometry_patch14(monkeypatch, height, width):
    """forward pads to a multiple of 14, resizes the decoder's grid to the padded size and crops.

    ``decode`` is replaced by a coordinate ramp sampled at the centres of a coarse grid (half a
    token per cell). Upsampled bilinearly (align_corners=False) onto the padded image, it must give
    every pixel its own centre coordinate: any stretch (resizing to the unpadded size) or shift
    (padding on the top/left, centre cropping) breaks this.
    """
    model = build("primus", "dinov2").eval()
    seen = {}

    def fake_decode(x):
        seen["x"] = x
        pad_h, pad_w = x.shape[-2:]
        assert pad_h % 14 == 0 and pad_w % 14 == 0
        cells_h, cells_w = 2 * pad_h // 14, 2 * pad_w // 14
        ys = (torch.arange(cells_h) + 0.5) * pad_h / cells_h
        xs = (torch.arange(cells_w) + 0.5) * pad_w / cells_w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([grid_y, grid_x])[None].expand(x.shape[0], -1, -1, -1)

    monkeypatch.setattr(model, "decode", fake_decode)
    x = torch.randn(1, 3, height, width)
    out = model(x)

    pad_h, pad_w = -(-height // 14) * 14, -(-width // 14) * 14
    assert seen["x"].shape[-2:] == (pad_h, pad_w)
    assert torch.equal(seen["x"][..., :height, :width], x)  # image at the top-left, untouched
    if (pad_h, pad_w) == (height, width):
        assert torch.equal(seen["x"], x)
    half_cell = 3.5  # cell centres sit 3.5 px from the border; bilinear clamps beyond them
    expected_y = (torch.arange(height) + 0.5).clamp(half_cell, pad_h - half_cell)
    expected_x = (torch.arange(width) + 0.5).clamp(half_cell, pad_w - half_cell)
    assert out.shape == (1, 2, height, width)
    torch.testing.assert_close(out[0, 0], expected_y[:, None].expand(height, width), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, 1], expected_x[None, :].expand(height, width), atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=list(VARIANTS))
def default_dinov2(request):
    """Models with the default decoder options on a patch-14 backbone."""
    return request.param, build(request.param, "dinov2", default_decoder=True).eval()


@pytest.mark.parametrize("height,width", [(80, 110), (98, 70)], ids=["even-grid-6x8", "odd-grid-7x5"])
def test_decoder_output_covers_token_grid_patch14(default_dinov2, height, width):
    """Each decoder's logits are the token grid times one factor on both axes (no extra row/column).

    ``forward`` resizes the logits onto the padded image; a decoder whose output covers one token
    more than the input (e.g. from a ceil-mode 0.5x level on an odd grid) would be squeezed, i.e.
    misregistered. Decoders with a 0.5x level declare ``token_grid_multiple = 2`` so the padding
    in ``forward`` always gives them an even grid.
    """
    variant, model = default_dinov2
    multiple = 14 * model.token_grid_multiple
    grid_h, grid_w = (-(-height // multiple) * multiple) // 14, (-(-width // multiple) * multiple) // 14
    x = pad_to_multiple(torch.randn(1, 3, height, width), multiple)
    assert x.shape[-2:] == (grid_h * 14, grid_w * 14)
    with torch.no_grad():
        logits = model.decode(x)
    out_h, out_w = logits.shape[-2:]
    assert out_h % grid_h == 0 and out_w % grid_w == 0 and out_h // grid_h == out_w // grid_w, (
        f"decoder output {(out_h, out_w)} is not a multiple of the token grid {(grid_h, grid_w)}"
    )


def test_bf16_autocast_matches_fp32(case):
    """Mixed precision keeps outputs numerically equivalent to the fp32 model: relative error below 1e-2, 1.5e-2 for
    Primus, whose transposed convolutions carry the tokens' bf16 rounding to every pixel (measured over 4 seeds:
    0.002-0.005 for the other decoders, 0.008-0.011 for Primus without the detail path)."""
    variant, _, model = case
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x).float()
    tolerance = 1.5e-2 if variant in ("primus", "primus_ms") else 1e-2
    assert ((mixed - reference).norm() / reference.norm()).item() < tolerance


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_classifier_is_the_only_layer_that_depends_on_num_classes(variant):
    """What -pretrained_weights leaves out when the new dataset has other labels (nnU-Net's seg layers)."""
    three, five = build(variant, "dinov3", num_classes=3), build(variant, "dinov3", num_classes=5)
    other = five.state_dict()
    differing = sorted(k for k, v in three.state_dict().items() if other[k].shape != v.shape)
    assert differing == sorted(three.classifier_keys())


@pytest.mark.parametrize("variant,backbone,join_stride", [
    ("dpt", "dinov3", 2), ("dpt", "dinov2", 2), ("upernet", "dinov3", 4), ("upernet", "dinov2", 4),
    ("segformer", "dinov3", 4), ("primus", "dinov3", 4), ("primus", "dinov2", 4),
])
def test_detail_path_joins_the_decoder_at_its_finest_grid(variant, backbone, join_stride):
    """The detail path replaces the decoder's classifier and meets its features on the nearest grid: DPT's
    fusion output is 1/2 of the image, the pyramid decoders' finest level 1/4, Primus's tokens go to 1/4."""
    plain, detail = build(variant, backbone), build(f"{variant}_detail", backbone)
    assert plain.detail is None and detail.detail is not None
    assert DETAIL_STRIDES[detail.detail.join_level] == join_stride
    assert isinstance(detail.classifier, torch.nn.Conv2d)
    assert detail.classifier.in_channels == detail.detail.out_channels
    assert not any(name.startswith("detail.") for name, _ in plain.named_parameters())
    # The decoder's own classifier is gone: the detail path's features are classified by a 1x1 convolution.
    assert [p.shape for p in plain.classifier.parameters()] != [p.shape for p in detail.classifier.parameters()]
    names = [name for name, _ in detail.named_parameters()]
    assert not any(name.startswith(("head.head.4", "head.classifier", "decoder.")) for name in names)


@pytest.mark.parametrize("variant", ["dpt", "upernet", "primus"])
def test_detail_path_sees_single_pixels(variant):
    """A one-pixel change of the input moves the detail-path logits at that pixel far more than 4 pixels away;
    the plain decoder, which sees the image only through 16-pixel patches, cannot tell the two apart."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    bumped = x.clone()
    bumped[..., 33, 33] += 10.0
    spread = {}
    for name in (variant, f"{variant}_detail"):
        model = build(name, "dinov3").eval()
        with torch.no_grad():
            change = (model(bumped) - model(x)).abs().sum(1)[0]
        spread[name] = (change[33, 33] / change[33, 37]).item()  # the bumped pixel vs 4 px away, same patch
    assert spread[f"{variant}_detail"] > 4.0 > 2.0 > spread[variant], spread


# ------------------------------------------------------------------------------ torch.compile


@pytest.fixture
def fresh_dynamo():
    """Each test compiles new model instances of shared classes: start below dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiles_to_one_graph_with_lora(variant, fresh_dynamo):
    """No graph breaks (timm ViT, peft LoRA, HF / nnU-Net decoder blocks, padding and crop): compile
    sees each training forward whole. Backend "eager" traces with dynamo without generating code."""
    model = build(variant, "dinov3", use_lora=True)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # raises on a graph break
    x = torch.randn(2, 3, 70, 50)
    assert compiled(x).shape == (2, NUM_CLASSES, 70, 50)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_compiled_forward_and_backward_match_eager(fresh_dynamo):
    """AOT autograd (what inductor builds on) gives the eager model's outputs and gradients."""
    model = build("dpt", "dinov3", use_lora=True, lora_dropout=0.0).eval()  # eval: no dropout to compare
    x = torch.randn(2, 3, 64, 48)

    def outputs_and_grads(module):
        model.zero_grad(set_to_none=True)
        out = module(x)
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    eager_out, eager_grads = outputs_and_grads(model)
    compiled_out, compiled_grads = outputs_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
