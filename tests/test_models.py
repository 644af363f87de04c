"""Models built through timm with the card's TF settings; effnet's preprocessing is timm's; a training step for
every variant (L2's is slow); local weights files (safetensors, .pth) load exactly, or fail in one line.

No test downloads anything (pretrained=False throughout): weights files are saved here from timm models.
"""
from __future__ import annotations

import argparse
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from safetensors.torch import save_file
from timm.layers import Conv2dSame, DropPath
from timm.optim import create_optimizer_v2
from torch import nn

from effnet import models, variants
from effnet.data import transforms
from effnet.errors import EffnetError

CARD = list(variants.table())
# With one thread (below) b0-b8 and the EdgeTPU trio each step in under 2 s at 64 px on 2 cores. L2 steps too,
# but takes ~30 s and 8.5 GB (480 M parameters with gradients and RMSProp state): `make test-all` runs it.
SLOW_STEP = {"tf_efficientnet_l2_ns_475"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread. With more, OpenMP workers spin-wait and a step that takes 0.05 s
    alone takes seconds whenever other processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def meta_build(variant: variants.Variant, num_classes: int = 1000) -> nn.Module:
    with torch.device("meta"):
        return models.build(variant, num_classes=num_classes)


# --- TF settings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CARD + ["phi-3"])
def test_tf_settings_and_recipe(name):
    v = variants.compound(-3) if name == "phi-3" else variants.table()[name]
    model = meta_build(v, num_classes=7)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and m.momentum == pytest.approx(1 - v.recipe.bn_momentum, abs=1e-12)
                       and m.momentum == 0.01 for m in bns)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        k, s = conv.kernel_size[0], conv.stride[0]
        # TF 'same': dynamic (asymmetric) padding where the stride needs it, symmetric (k-1)/2 where it is exact
        assert isinstance(conv, Conv2dSame) or (s == 1 and conv.padding == ((k - 1) // 2,) * 2), conv
    assert model.drop_rate == v.dropout
    n_blocks = sum(len(stage) for stage in model.blocks)
    drop_path = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    # TF's drop_connect_rate * block index / number of blocks, with survival_prob 0.8 -> 0.2
    assert max(drop_path) == pytest.approx((1 - v.recipe.survival_prob) * (n_blocks - 1) / n_blocks)
    assert model.get_classifier().out_features == 7


def test_same_padding_is_tfs():
    """A stride-2 3x3 conv on an even input pads (0, 1) like TF's 'SAME', not (1, 1) like PyTorch's padding=1."""
    model = models.build(variants.compound(-6), num_classes=2).eval()
    conv = model.conv_stem
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2), atol=1e-6)


# --- preprocessing ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with cbook.get_sample_data("grace_hopper.jpg") as f:  # a real photograph bundled with matplotlib
        return Image.open(f).convert("RGB")


@pytest.mark.parametrize("name", CARD)
def test_eval_preprocessing_is_timms(name, photo):
    v = variants.table()[name]
    ours = models.preprocessing(meta_build(v), v)
    with torch.device("meta"):
        reference = timm.create_model(v.arch, pretrained=False)
    cfg = timm.data.resolve_data_config(model=reference)
    assert (ours.img_size, ours.crop_pct, ours.interpolation, ours.mean, ours.std) == \
        (cfg["input_size"][1], cfg["crop_pct"], cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]))
    a, b = transforms.eval_transform(ours)(photo), timm.data.create_transform(**cfg)(photo)
    assert a.shape == b.shape == (3, v.img_size, v.img_size)
    assert (a - b).abs().max().item() <= 1e-6


# --- a training step --------------------------------------------------------------------------------------------

def _step_params() -> list:
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_STEP else []) for name in CARD]


@pytest.mark.parametrize("name", _step_params())
def test_training_step(name):
    torch.manual_seed(0)
    v = variants.table()[name]
    model = models.build(v, num_classes=3).train()
    optimizer = create_optimizer_v2(model, "rmsproptf", lr=1e-3, momentum=v.recipe.momentum,
                                    weight_decay=v.recipe.weight_decay, alpha=v.recipe.rmsprop_decay)
    before = model.conv_head.weight.detach().clone()
    logits = model(torch.randn(2, 3, 64, 64))
    loss = F.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=v.recipe.label_smoothing)
    loss.backward()
    optimizer.step()
    assert logits.shape == (2, 3) and torch.isfinite(logits).all() and math.isfinite(loss.item())
    assert not torch.equal(before, model.conv_head.weight) and torch.isfinite(model.conv_head.weight).all()


# --- local weights files ----------------------------------------------------------------------------------------

def timm_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """A timm model's weights, with BatchNorm statistics that are not the defaults (so they must be loaded)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def b0_files(tmp_path_factory):
    b0 = variants.table()["tf_efficientnet_b0"]
    state = timm_state(b0.arch, seed=1)
    d = tmp_path_factory.mktemp("weights")
    save_file(state, str(d / "b0.safetensors"))
    torch.save(state, d / "b0.pth")
    torch.save({"state_dict": {f"module.{k}": t for k, t in state.items()}, "epoch": 3}, d / "b0_checkpoint.pth")
    return state, d


def logits_of(model: nn.Module, state: dict | None = None) -> torch.Tensor:
    if state is not None:
        model.load_state_dict(state)
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize("file", ["b0.safetensors", "b0.pth", "b0_checkpoint.pth"])
def test_weights_file_gives_identical_logits(b0_files, file):
    state, d = b0_files
    b0 = variants.table()["tf_efficientnet_b0"]
    expected = logits_of(timm.create_model(b0.arch, pretrained=False), state)
    torch.manual_seed(7)  # another initialisation: everything must come from the file
    model = models.build(b0, num_classes=1000)
    models.load_weights(model, d / file, b0.name)
    assert torch.equal(logits_of(model), expected)


def test_classifier_of_another_size_is_reinitialised_alone(b0_files, caplog):
    state, d = b0_files
    b0 = variants.table()["tf_efficientnet_b0"]
    model = models.build(b0, num_classes=5)
    with caplog.at_level(logging.WARNING, logger="effnet.models"):
        models.load_weights(model, d / "b0.safetensors", b0.name)
    assert "re-initialising the classifier" in caplog.text and "1000" in caplog.text and "5" in caplog.text
    loaded = model.state_dict()
    body = [k for k in state if not k.startswith("classifier.")]
    assert body and all(torch.equal(loaded[k], state[k]) for k in body)
    assert loaded["classifier.weight"].shape == (5, state["classifier.weight"].shape[1])
    bound = 1 / math.sqrt(5)  # TF/timm's uniform init of a fresh classifier, zero bias
    assert loaded["classifier.weight"].abs().max() <= bound and not loaded["classifier.bias"].any()
    assert torch.isfinite(logits_of(model)).all()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_of_another_variant_fail_in_one_line(tmp_path, suffix):
    b1 = variants.table()["tf_efficientnet_b1"]
    state = timm_state(b1.arch, seed=2)
    path = tmp_path / f"downloaded{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    b0 = variants.table()["tf_efficientnet_b0"]
    with pytest.raises(EffnetError) as e:
        models.load_weights(models.build(b0, num_classes=10), path, b0.name)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    assert str(path) in msg and "tf_efficientnet_b0" in msg and "tf_efficientnet_b1" in msg


def test_weights_only(tmp_path, b0_files):
    """A .pth that needs more than tensors to unpickle is refused, as are missing files."""
    state, _ = b0_files
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)
    b0 = variants.table()["tf_efficientnet_b0"]
    for bad in (path, tmp_path / "missing.safetensors"):
        with pytest.raises(EffnetError) as e:
            models.load_weights(models.build(b0, num_classes=10), bad, b0.name)
        assert str(bad) in str(e.value) and len(str(e.value).splitlines()) == 1
