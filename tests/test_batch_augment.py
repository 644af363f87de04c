"""BatchAugment against the per-image torchvision transforms it replaces (`batch_augment.augmenter`): each batched op equals
torchvision's op image by image, the sampler draws what torchvision's transforms draw, and the number of torch ops
per batch does not grow with the batch size."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from effnet.data import batch_augment
from effnet.data.batch_augment import OP_NAMES, BatchAugment

MEAN = (0.485, 0.456, 0.406)
FILL = [min(255, round(255 * m)) for m in MEAN]  # (124, 116, 104), as batch_augment.augmenter
H, W = 40, 56  # not square, so that a mix-up of height and width shows


def photos(n: int, h: int = H, w: int = W) -> torch.Tensor:
    """n different crops of matplotlib's Grace Hopper photo, resized to h x w: uint8 (n, 3, h, w)."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        cw, ch = rng.integers(photo.width // 3, photo.width), rng.integers(photo.height // 3, photo.height)
        x0, y0 = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1))
    return torch.stack(out)


# torchvision's own per-image op dispatch (what AutoAugment / RandAugment call once per image), as reference
_TV = v2.AutoAugment(interpolation=InterpolationMode.BILINEAR, fill=FILL)


def tv_op(img: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    return _TV._apply_image_or_video_transform(img, name, magnitude, interpolation=_TV.interpolation, fill=_TV._fill)


def solarize_levels():
    """Thresholds of both tables, incl. 2/3 and 0.4 whose 255 * m lie just above 170 and 102 in double precision."""
    return [float(v) for v in (*torch.linspace(1.0, 0.0, 10)[[1, 3, 6]], *torch.linspace(1.0, 0.0, 11)[[6, 8, 10]])]


MAGNITUDES = {  # six per-image magnitudes per op, torchvision's meaning (tan(shear), pixels, degrees, factor - 1)
    "ShearX": [-0.3, -0.1, 0.0, 0.1667, 0.3, 0.2333],
    "ShearY": [-0.3, -0.1, 0.0, 0.1667, 0.3, 0.2333],
    "TranslateX": [-25.4, -3.7, 0.0, 5.9, 13.0, 20.3],
    "TranslateY": [-18.1, -3.7, 0.0, 5.9, 13.0, 9.06],
    "Rotate": [-30.0, -13.3333, 0.0, 3.3333, 20.0, 26.6667],
    "Posterize": [0, 1, 4, 5, 6, 8],
    "Solarize": solarize_levels(),
    **{name: [-0.9, -0.5, -0.1, 0.0, 0.4, 0.9] for name in ("Brightness", "Color", "Contrast", "Sharpness")},
    **{name: [0.0] * 6 for name in ("AutoContrast", "Equalize", "Invert")},
}


@pytest.fixture(scope="module")
def images():
    return photos(6)


# --- each op, batched with a magnitude per image, vs torchvision's op image by image ----------------------------

@pytest.mark.parametrize("name", OP_NAMES)
def test_batched_op_matches_torchvision_per_image(name, images):
    """At most 1 level off, in at most 0.1% of the values: the batched ops do torchvision's arithmetic in the same
    order and dtype (on the CPU they are bit-identical now), but a kernel is free to round a multiply-add or a
    reduction differently for a batch than for one image (and CUDA's kernels differ from the CPU's)."""
    mags = torch.tensor(MAGNITUDES[name], dtype=torch.float32)
    got = BatchAugment("original").op(name, images, mags)
    want = torch.stack([tv_op(img, name, float(m)) for img, m in zip(images, mags)])
    assert got.shape == want.shape and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.001, f"{name}: {(diff > 0).sum()} values differ"
    # the magnitudes matter: exactly the images whose magnitude is not the op's identity changed
    if name not in ("AutoContrast", "Equalize", "Invert"):
        identity = {"Posterize": 8, "Solarize": None}.get(name, 0.0)  # 8 bits kept; factor 1, no shift, no angle
        assert (got != images).flatten(1).any(1).tolist() == [m != identity for m in MAGNITUDES[name]]


def test_geometric_ops_fill_the_uncovered_area_with_the_mean_colour(images):
    aug = BatchAugment("rand-m9", mean=MEAN)
    shifted = aug.op("TranslateX", images[:2], torch.tensor([10.0, -10.0]))
    fill = torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1)
    assert (shifted[0, :, :, :10] == fill).all() and (shifted[1, :, :, -10:] == fill).all()
    assert torch.equal(shifted[0, :, :, 10:], images[0, :, :, :-10])  # whole-pixel shifts move pixels unchanged
    rotated = aug.op("Rotate", images[:1], torch.tensor([30.0]))
    assert (rotated[0, :, 0, 0] == fill.view(3)).all() and (rotated[0, :, -1, -1] == fill.view(3)).all()


# --- whole policies: what was drawn, applied batched vs image by image ------------------------------------------

@pytest.mark.parametrize("policy", ["original", "rand-m9-mstd0.5", "rand-m5-n3", None])
def test_batch_equals_torchvision_replaying_the_same_draws(policy, images):
    torch.manual_seed(0)
    x = images.repeat(4, 1, 1, 1)  # 24 images
    aug = BatchAugment(policy, mean=MEAN)
    plan = aug.sample(len(x), H, W)
    got = aug.apply(x, plan)
    want = x.clone()
    for op, mag in plan:
        for i, (k, m) in enumerate(zip(op.tolist(), mag.tolist())):
            if k >= 0:
                want[i] = tv_op(want[i], OP_NAMES[k], m)
    # as per op (1 level in 0.1% of values), except that a later op may widen a 1-level difference (Posterize
    # across a bit boundary, Solarize across its threshold, Equalize or AutoContrast stretching levels apart)
    diff = (got.int() - want.int()).abs()
    assert (diff > 0).float().mean() <= 0.001, f"{(diff > 0).sum()} values differ, max by {diff.max()}"
    assert got.shape == x.shape and got.dtype == torch.uint8 and got.device == x.device
    assert (got != x).flatten(1).any(1).float().mean() > 0.5  # most images changed


def test_call_keeps_shape_dtype_device_and_leaves_input_alone(images):
    x = images.clone()
    for policy in ("original", "rand-m9-mstd0.5", None):
        out = BatchAugment(policy)(x)
        assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
        assert torch.equal(x, images)
    assert BatchAugment("original")(x[:0]).shape == (0, 3, H, W)
    aug = BatchAugment("rand-m9-mstd0.5")
    torch.manual_seed(7)
    first = aug(x)
    torch.manual_seed(7)
    assert torch.equal(aug(x), first)  # torch's seed governs the draws, as it does torchvision's


# --- sampling distributions ------------------------------------------------------------------------------------

N = 20_000


def tolerance(p: float, n: int = N, k: int = 2) -> float:
    """5 standard deviations of the difference of k independent frequency estimates of p, plus a little."""
    return 5 * (k * p * (1 - p) / n) ** 0.5 + 1e-3


def recorded_torchvision_calls(transform, n: int, h: int = H, w: int = W) -> list[list[tuple[str, float]]]:
    """The (op, magnitude) calls torchvision's transform makes on n images, per image (ops replaced by a recorder)."""
    calls = []
    transform._apply_image_or_video_transform = lambda img, name, m, **_: calls[-1].append((name, m)) or img
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    for _ in range(n):
        calls.append([])
        transform(img)
    return calls


def frequencies(keys, n: int) -> dict:
    return {k: c / n for k, c in Counter(keys).items()}


def assert_same_frequencies(got: dict, want: dict, n: int = N):
    for key in set(got) | set(want):
        g, w = got.get(key, 0.0), want.get(key, 0.0)
        assert abs(g - w) <= tolerance(max(g, w), n), f"{key}: {g:.4f} vs {w:.4f}"


def plan_calls(plan) -> list[tuple]:
    """(slot, op name, magnitude rounded) of every applied op in a plan."""
    return [(s, OP_NAMES[k], round(m, 4)) for s, (op, mag) in enumerate(plan)
            for k, m in zip(op.tolist(), mag.tolist()) if k >= 0]


def test_autoaugment_sampler_matches_the_policy_table():
    torch.manual_seed(1)
    aug = BatchAugment("original")
    plan = aug.sample(N, H, W)
    got = plan_calls(plan)
    # the table: each of the 25 sub-policies 1/25, each of its two ops applied with its probability
    want = Counter()
    for policy in aug.reference._policies:
        for slot, (name, p, _) in enumerate(policy):
            want[slot, name] += p / len(aug.reference._policies)
    assert_same_frequencies(frequencies([(s, name) for s, name, _ in got], N), dict(want))
    # and the two slots come from the same sub-policy: (op or None, op or None) per image
    pairs = Counter()
    for (a, pa, _), (b, pb, _) in aug.reference._policies:
        for applied_a in (True, False):
            for applied_b in (True, False):
                key = (a if applied_a else None, b if applied_b else None)
                pairs[key] += (pa if applied_a else 1 - pa) * (pb if applied_b else 1 - pb) / 25
    (op_a, _), (op_b, _) = plan
    drawn = [tuple(OP_NAMES[k] if k >= 0 else None for k in ks) for ks in zip(op_a.tolist(), op_b.tolist())]
    assert_same_frequencies(frequencies(drawn, N), dict(pairs))
    # signed ops are negated half the time, the others never
    for name in ("Rotate", "Color", "Sharpness", "ShearX"):
        signs = [m < 0 for _, op, m in got if op == name and m != 0]  # Color 0 (bin 0) has no sign
        assert abs(np.mean(signs) - 0.5) <= tolerance(0.5, len(signs), k=1)
    assert all(m >= 0 for _, op, m in got if op in ("Posterize", "Solarize"))


def test_autoaugment_sampler_draws_what_torchvision_draws():
    """Per image, the sequence of (op, signed magnitude) calls (so the pairing of the two ops of a sub-policy
    counts too): frequencies of torchvision's transform vs the batch sampler."""
    torch.manual_seed(2)
    tv = recorded_torchvision_calls(batch_augment.augmenter("original", MEAN), N)
    want = frequencies([tuple((name, round(m, 4)) for name, m in calls) for calls in tv], N)
    plan = BatchAugment("original").sample(N, H, W)
    got = frequencies([tuple((OP_NAMES[k], round(m, 4)) for k, m in calls if k >= 0)
                       for calls in zip(*(zip(op.tolist(), mag.tolist()) for op, mag in plan))], N)
    assert len(want) >= 50  # sub-policies x which of their ops applied x signs
    assert_same_frequencies(got, want, N)


def test_randaugment_sampler_draws_what_torchvision_draws():
    """Slot by slot: uniform over the 14 ops (Identity included), magnitude bin M of 11, random sign."""
    torch.manual_seed(3)
    tv = recorded_torchvision_calls(batch_augment.augmenter("rand-m9-mstd0.5", MEAN), N)
    want = frequencies([(s, name, round(m, 4)) for calls in tv for s, (name, m) in enumerate(calls)
                        if name != "Identity"], N)
    aug = BatchAugment("rand-m9-mstd0.5")
    plan = aug.sample(N, H, W)
    got = frequencies(plan_calls(plan), N)
    assert_same_frequencies(got, want, N)
    for op, _ in plan:  # each op (and Identity, -1) 1/14 per slot
        counts = torch.bincount(op + 1, minlength=len(OP_NAMES) + 1)
        keep = [0] + [1 + OP_NAMES.index(name) for name in aug.reference._AUGMENTATION_SPACE if name != "Identity"]
        assert len(keep) == 14 and counts.sum() == counts[keep].sum()
        assert (counts[keep] / N - 1 / 14).abs().max() <= tolerance(1 / 14, N, k=1)


def test_colorjitter_sampler_random_order_and_factors():
    torch.manual_seed(4)
    plan = BatchAugment(None).sample(N, H, W)
    names = ("Brightness", "Contrast", "Color")
    ops = torch.stack([op for op, _ in plan], 1)  # (N, 3): each image's order
    assert all(sorted(OP_NAMES[k] for k in row) == sorted(names) for row in ops[:100].tolist())
    assert (ops.sort(1).values == ops[0].sort().values).all()  # every image gets each of the three once
    for slot in range(3):
        for name in names:
            assert abs((ops[:, slot] == OP_NAMES.index(name)).float().mean() - 1 / 3) <= tolerance(1 / 3, k=1)
    factors = 1 + torch.stack([m for _, m in plan])
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert torch.allclose(factors.flatten().quantile(torch.tensor([0.25, 0.5, 0.75])),
                          torch.tensor([0.8, 1.0, 1.2]), atol=0.01)


# --- the number of torch ops per batch -------------------------------------------------------------------------

def count_torch_ops(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize("policy", ["original", "rand-m9-mstd0.5", None])
def test_op_count_does_not_grow_with_batch_size(policy, monkeypatch):
    torch.manual_seed(5)
    aug = BatchAugment(policy, mean=MEAN)
    x = photos(8, 16, 16).repeat(64, 1, 1, 1)  # 512 images
    op_calls = []
    monkeypatch.setattr(aug, "op", lambda name, *a, _op=aug.op: op_calls.append(name) or _op(name, *a))
    batched = {n: count_torch_ops(lambda: aug(x[:n])) for n in (64, 512)}
    loop = {n: count_torch_ops(lambda: [aug.reference(img) for img in x[:n]]) for n in (8, 64)}
    # one op application per (slot, op type) drawn, however many images drew it
    slots = len(aug.sample(1, 16, 16))
    assert len(op_calls) <= 2 * slots * len(OP_NAMES)  # both calls together
    # so 8 times the images cost about as many torch ops: a few more (op, slot) pairs drawn, nothing per image
    assert batched[512] <= 1.5 * batched[64], batched
    # while the per-image loop grows with the batch, and is far more ops at 64 than batched at 512
    assert loop[64] >= 6 * loop[8] and loop[64] > 2 * batched[512], (loop, batched)
