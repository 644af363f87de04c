"""The model card as data: every one of its thirteen variants, exact, against timm and the card's own figures;
the card's compound scaling; `effnet variants`.

Models are built on the meta device (shapes, no memory, no compute): even L2 (480 M parameters) costs ~1 s.
Reference figures are the card's (variants.yaml is the card as data) and timm's registry, never this code's output.
"""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch import nn

from effnet import cli, models, variants

CARD = list(variants.table())
# The timm checkpoint each card row describes: the card's top1/top5 are this tag's in timm's results-imagenet.csv
# (e.g. b0 76.85/93.23 ~ tf_efficientnet_b0.aa_in1k 76.834/93.220, b8 85.35/97.39 ~ .ra_in1k 85.368/97.394,
# where the bare name now resolves to .ns_jft_in1k, or .ap_in1k for b8).
TIMM_NAME = {
    **{f"tf_efficientnet_b{i}": f"tf_efficientnet_b{i}.aa_in1k" for i in (0, 1, 2, 3, 4, 6)},
    **{f"tf_efficientnet_b{i}": f"tf_efficientnet_b{i}.ra_in1k" for i in (5, 7, 8)},
    **{f"tf_efficientnet_{s}": f"tf_efficientnet_{s}.in1k" for s in ("es", "em", "el")},
    "tf_efficientnet_l2_ns_475": "tf_efficientnet_l2.ns_jft_in1k_475",
}
REQUIRED_KEYS = {"name", "params", "flops", "img_size", "crop_pct", "interpolation", "top1", "top5"}


def meta_build(variant: variants.Variant, num_classes: int = 1000) -> nn.Module:
    with torch.device("meta"):
        return models.build(variant, num_classes=num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_card_has_its_thirteen_variants():
    assert set(CARD) == set(TIMM_NAME) and len(CARD) == 13


@pytest.mark.parametrize("name", CARD)
def test_parameter_count_rounds_to_the_card(name):
    v = variants.table()[name]
    n = n_params(meta_build(v))
    # The card rounds to the nearest million: b1 7.79 M -> 8, em 6.90 M -> 7, el 10.59 M -> 11 rule out floor
    # (no variant sits at .5, so round-half-up and round-half-even agree).
    assert round(n / 1e6) == v.params_m, f"{name}: {n / 1e6:.2f} M vs the card's {v.params_m}"
    with torch.device("meta"):
        assert n == n_params(timm.create_model(TIMM_NAME[name], pretrained=False))


@pytest.mark.parametrize("name", CARD)
def test_preprocessing_figures_equal_timm_and_the_card(name):
    v = variants.table()[name]
    assert v.arch == TIMM_NAME[name]
    cfg = timm.models.get_pretrained_cfg(TIMM_NAME[name])
    assert cfg is not None, TIMM_NAME[name]
    assert (cfg.input_size[1:], cfg.crop_pct, cfg.interpolation) == ((v.img_size, v.img_size), v.crop_pct,
                                                                     v.interpolation)


def test_yaml_rows_are_the_tf_reference_scaling():
    """width/depth/dropout of B0-B7 are the TF reference's efficientnet_params (timm's docstring copies them)."""
    tf_params = {"b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
                 "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
                 "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5), "b8": (2.2, 3.6, 672, 0.5)}
    for key, row in tf_params.items():
        v = variants.table()[f"tf_efficientnet_{key}"]
        assert (v.width, v.depth, v.img_size, v.dropout) == row


# --- compound scaling -------------------------------------------------------------------------------------------

def tf_round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """efficientnet_model.round_filters of the TF reference, written out independently of timm."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * filters else new)


B0_STAGES = [(1, 16), (2, 24), (2, 40), (3, 80), (3, 112), (4, 192), (1, 320)]  # (repeats, channels)


def test_phi_zero_is_b0_exactly():
    v, b0 = variants.compound(0), variants.table()["tf_efficientnet_b0"]
    assert (v.width, v.depth, v.img_size, v.crop_pct, v.interpolation) == (1.0, 1.0, 224, b0.crop_pct,
                                                                          b0.interpolation)
    ours = models.build(v, num_classes=1000)
    theirs = timm.create_model("tf_efficientnet_b0", pretrained=False, bn_momentum=0.01,
                               drop_rate=0.2, drop_path_rate=0.2)
    assert n_params(ours) == n_params(theirs) == n_params(models.build(b0, num_classes=1000))
    assert repr(ours) == repr(theirs)  # same modules, hyper-parameters and order
    assert {k: t.shape for k, t in ours.state_dict().items()} == {k: t.shape for k, t in theirs.state_dict().items()}
    assert models.preprocessing(ours, v) == models.preprocessing(theirs, b0)


@pytest.mark.parametrize("phi", [-6, -4, -3, -1, 1, 2.5])
def test_compound_scaling_follows_the_card(phi):
    v = variants.compound(phi)
    assert v.width == pytest.approx(1.1 ** phi) and v.depth == pytest.approx(1.2 ** phi)
    assert v.img_size == round(224 * 1.15 ** phi)
    model = meta_build(v)
    assert model.conv_stem.out_channels == tf_round_filters(32, v.width)
    assert model.conv_head.out_channels == tf_round_filters(1280, v.width)
    assert [len(stage) for stage in model.blocks] == [math.ceil(v.depth * r) for r, _ in B0_STAGES]
    # a stage's output: the projection of its last block (inverted residual conv_pwl; B0's first stage is a
    # depthwise-separable block whose projection is conv_pw)
    outputs = [getattr(stage[-1], "conv_pwl", stage[-1].conv_pw).out_channels for stage in model.blocks]
    assert outputs == [tf_round_filters(c, v.width) for _, c in B0_STAGES]


def test_phi_minus_four_is_128_px_and_resolve_picks_it():
    assert variants.compound(-4).img_size == 128
    assert variants.resolve(phi=-4) == variants.compound(-4)
    assert variants.resolve("tf_efficientnet_b3") is variants.table()["tf_efficientnet_b3"]


# --- `effnet variants` ------------------------------------------------------------------------------------------

def run_cli(capsys, *args) -> str:
    assert cli.main(["variants", *args]) == 0
    return capsys.readouterr().out


def test_variants_json_lists_the_card(capsys):
    rows = json.loads(run_cli(capsys, "--json"))
    assert [r["name"] for r in rows] == CARD
    for r in rows:
        assert REQUIRED_KEYS <= r.keys()
        v = variants.table()[r["name"]]
        assert (r["params"], r["flops"], r["img_size"], r["crop_pct"], r["interpolation"], r["top1"], r["top5"]) == \
            (v.params_m, v.flops_g, v.img_size, v.crop_pct, v.interpolation, v.top1, v.top5)


def test_variants_phi_adds_the_compound_row(capsys):
    rows = json.loads(run_cli(capsys, "--json", "--phi", "-3"))
    assert len(rows) == 14 and [r["name"] for r in rows[:13]] == CARD
    extra = rows[13]
    assert REQUIRED_KEYS <= extra.keys() and extra["phi"] == -3 and extra["img_size"] == round(224 * 1.15 ** -3)
    assert extra["params"] == pytest.approx(n_params(meta_build(variants.compound(-3))) / 1e6, abs=0.01)


def hooked_macs(model: nn.Module, img_size: int) -> int:
    """Multiply-adds of every convolution and linear layer, counted from their output shapes (not FlopCounterMode)."""
    total = 0

    def hook(module, _, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        else:
            total += out.numel() * module.in_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, img_size, img_size, device="meta"))
    return total


def test_variants_flops_are_measured_multiply_adds(capsys):
    rows = {r["name"]: r for r in json.loads(run_cli(capsys, "--json", "--flops", "--phi", "-2"))}
    assert all(r["flops_measured"] > 0 for r in rows.values())
    for name in ("tf_efficientnet_b0", "tf_efficientnet_es", "tf_efficientnet_phi-2"):
        v = variants.table().get(name) or variants.compound(-2)
        assert rows[name]["flops_measured"] == pytest.approx(hooked_macs(meta_build(v), v.img_size) / 1e9, abs=1e-3)
        assert rows[name]["params_measured"] == pytest.approx(n_params(meta_build(v)) / 1e6, abs=0.01)
    # Beside the card: the same ranking B0 < ... < B8 < L2 (the card's figures run ~1.27x these multiply-adds).
    series = [f"tf_efficientnet_b{i}" for i in range(9)] + ["tf_efficientnet_l2_ns_475"]
    measured = [rows[n]["flops_measured"] for n in series]
    card = [rows[n]["flops"] for n in series]
    assert measured == sorted(measured) and card == sorted(card)


def test_variants_table_prints_every_row(capsys):
    out = run_cli(capsys, "--phi", "-4")
    for name in CARD + ["phi-4"]:
        assert name.removeprefix("tf_efficientnet_") in out
    assert "bicubic" in out and "76.85" in out
