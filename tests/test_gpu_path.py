"""The GPU data path (`data.decode: gpu`), run on CPU tensors: its functions are device-agnostic, so what the CUDA
device runs is checked here against timm's CPU transforms, and `decode: gpu` without CUDA falls back to the CPU."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation

from effnet import lightning
from effnet.data import batch_augment, datamodule, feed, gpu, loaders, reading, transforms
from effnet.models import Preprocessing
from effnet.stages import train

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
PRE224 = Preprocessing(img_size=224, crop_pct=0.875, interpolation="bicubic", **IMAGENET)


def photo_jpeg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine noise (as bench/common.py draws them)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    img = np.clip(np.asarray(coarse) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def batch_of(jpegs: list[bytes]) -> list:
    """A loader batch of the GPU path: [(flat bytes, byte counts), labels]."""
    return gpu.collate_jpeg([(b, i) for i, b in enumerate(jpegs)])


def preprocess(pre: feed.DeviceFeed, jpegs: list[bytes], train: bool) -> torch.Tensor:
    return pre(batch_of(jpegs), train, "cpu")[0]


# --- fallback --------------------------------------------------------------------------------------------------

def test_resolve_decode_falls_back_to_cpu_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="effnet.data.feed"):
        assert feed.resolve_decode("cpu") == "cpu"
        assert not caplog.records
        assert feed.resolve_decode("gpu", "auto") == "cpu"
    assert len(caplog.records) == 1 and "decoding and augmenting on the CPU" in caplog.records[0].getMessage()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA there, but the Trainer runs on a TPU
    assert feed.resolve_decode("gpu", "tpu") == "cpu"
    assert feed.resolve_decode("gpu", "auto") == "gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_train_with_decode_gpu_and_no_cuda_uses_the_cpu_path(tiny_params, shards_dir, workspace, caplog):
    params = tiny_params.model_copy(update={"data": tiny_params.data.model_copy(update={"decode": "gpu"}),
                                            # channels_last forced on: a CPU run must take that too
                                            "train": tiny_params.train.model_copy(update={"channels_last": True})})
    with caplog.at_level(logging.WARNING, logger="effnet.data.feed"):
        result = train.run(params, "tiny", shards_dir, workspace / "trained")
        pre = result.spec.preprocessing
        fed = feed.for_params(params, pre, channels_last=True)
    warned = [r for r in caplog.records if r.name == "effnet.data.feed"]
    assert len(warned) == 2 and "data.decode: gpu" in warned[0].getMessage()  # the stage's, then for_params'
    assert result.decode == "cpu" and (result.bundle / "model.safetensors").is_file()
    assert type(fed) is feed.DeviceFeed and not fed.decodes and fed.channels_last is True
    x, _ = fed([torch.zeros(2, 3, pre.img_size, pre.img_size, dtype=torch.uint8), torch.zeros(2)], True, "cpu")
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32


# --- the GPU path's functions on CPU tensors -------------------------------------------------------------------

class _Counting(feed.GpuPreprocess):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = {"train": 0, "eval": 0}

    def images(self, payload, train, device):
        self.calls["train" if train else "eval"] += 1
        return super().images(payload, train, device)


def test_lightning_steps_through_the_gpu_path_hooks_on_cpu(tiny_params, shards_dir, workspace):
    """The DataModule with the GPU path's feed on a CPU Trainer: workers yield bytes, the prefetch thread decodes
    them on the Trainer's device, train batches get the train augment and val batches the eval preprocessing."""
    from effnet import models
    variant = tiny_params.variant("tiny")
    model = models.build(variant, 4)
    pre = _Counting(models.preprocessing(model, variant, 32), "original", (0.25, 1.0))
    dm = datamodule.ShardDataModule(shards_dir, None, None, 8, 0, 16, pre)
    x, y = [], []

    class Grab(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            x.append(batch[0])
            y.append(batch[1])

    module = lightning.Classifier(model, 4, dict(opt="sgd", lr=0.01), None, 0.0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         num_sanity_val_steps=0, val_check_interval=2, callbacks=[Grab()])
    trainer.fit(module, datamodule=dm)
    # The prefetch thread works ahead: at most its depth (2) plus Lightning's own one-batch look-ahead more.
    assert 2 <= pre.calls["train"] <= 2 + 3 and 1 <= pre.calls["eval"] <= 1 + 3, pre.calls
    assert x[0].shape == (8, 3, 32, 32) and x[0].dtype == torch.float32 and y[0].dtype == torch.int64
    assert x[0].is_contiguous(memory_format=torch.channels_last)


def _crop_stats(crops: np.ndarray, area: float) -> dict[str, np.ndarray]:
    h, w = crops[:, 0], crops[:, 1]
    return {"scale": h * w / area, "log_ratio": np.log(w / h)}


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.25, 1.0)])
def test_crop_scale_and_ratio_statistics_agree_with_timm(scale):
    """20,000 crops of a 500x375 image from the GPU path's sampler (on a CHW tensor) and from timm's CPU
    RandomResizedCropAndInterpolation (on a PIL image, as the CPU path calls it): the crop area fraction and
    log aspect ratio agree in mean (within 0.01) and in the 5/25/50/75/95 % quantiles (within 0.02).
    (Sampling error at n = 20,000: about 0.003 on the means, 0.005-0.01 on the quantiles.)"""
    n, (W, H) = 20_000, (500, 375)
    tensor, pil = torch.zeros(3, H, W, dtype=torch.uint8), Image.new("RGB", (W, H))
    cpu_tf = RandomResizedCropAndInterpolation(224, scale=scale, interpolation="bicubic")
    import random
    random.seed(1)
    ours = np.array([gpu.crop_params(tensor, scale)[2:] for _ in range(n)], dtype=float)
    random.seed(2)
    theirs = np.array([cpu_tf.get_params(pil, cpu_tf.scale, cpu_tf.ratio)[2:] for _ in range(n)], dtype=float)
    assert (ours[:, 0] <= H).all() and (ours[:, 1] <= W).all()
    a, b = _crop_stats(ours, W * H), _crop_stats(theirs, W * H)
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    for key in a:
        print(f"{key} {scale}: mean {a[key].mean():.4f} vs timm {b[key].mean():.4f}; quantiles "
              f"{np.round(np.quantile(a[key], qs), 4)} vs {np.round(np.quantile(b[key], qs), 4)}")
        assert abs(a[key].mean() - b[key].mean()) < 0.01
        assert np.abs(np.quantile(a[key], qs) - np.quantile(b[key], qs)).max() < 0.02
    assert a["scale"].min() >= scale[0] - 0.01 and abs(a["log_ratio"]).max() <= np.log(4 / 3) + 0.01


EVAL_MAX_ABS = 0.035  # normalised units: 2 levels of 255 at std 0.224 (measured on CPU: 1 level, 0.0175)


@pytest.mark.parametrize("pre", [PRE224, PRE224.model_copy(update=dict(img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3))])
def test_eval_preprocessing_matches_the_cpu_path(pre, shards_dir):
    """The GPU path's eval preprocessing (decode_jpeg + resize by crop pct + center crop, bicubic antialias) vs
    timm's eval transform on PIL-decoded images: photo-like JPEGs of ImageNet-like and odd sizes, up- and
    down-scaled, plus the demo shards' JPEGs."""
    jpegs = [photo_jpeg(w, h, seed) for seed, (w, h) in enumerate([(500, 375), (375, 500), (640, 427), (333, 251),
                                                                   (180, 120), (97, 61)])]
    (flat, sizes), _, _ = next(iter(loaders.eval_loader(shards_dir, None, 8, 0)))  # the loader's raw-bytes mode
    jpegs += [bytes(t.numpy()) for t in gpu.unpack(flat, sizes)]
    cpu_tf = transforms.eval_transform(pre)
    cpu = torch.stack([cpu_tf(reading.decode({"jpg": b})) for b in jpegs])
    ours = preprocess(feed.GpuPreprocess(pre), jpegs, train=False)
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype
    diff = (ours - cpu).abs()
    levels = diff * torch.tensor(pre.std).view(1, 3, 1, 1) * 255
    print(f"eval GPU path vs CPU path, size {pre.img_size}: max abs diff {diff.max():.4f} (normalised), "
          f"{levels.max():.2f} levels of 255; mean abs diff {diff.mean():.5f}; "
          f"photos {diff[:6].max():.4f}, demo {diff[6:].max():.4f}")
    assert diff.max() <= EVAL_MAX_ABS and levels.max() <= 2.01 and levels.mean() < 0.05


@pytest.mark.parametrize("policy", ["original", transforms.RAND_AUGMENT, None])
def test_train_augment_batch_shape_dtype_and_normalisation(policy):
    jpegs = [photo_jpeg(500, 375, s) for s in range(6)] + [photo_jpeg(120, 200, 9)]
    pre = feed.GpuPreprocess(PRE224, policy, (0.08, 1.0))
    torch.manual_seed(0)
    x = preprocess(pre, jpegs, train=True)
    assert x.shape == (7, 3, 224, 224) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
    mean, std = torch.tensor(PRE224.mean).view(1, 3, 1, 1), torch.tensor(PRE224.std).view(1, 3, 1, 1)
    assert (x >= -mean / std - 1e-5).all() and (x <= (1 - mean) / std + 1e-5).all()
    # back to 0..255: whole numbers (uint8 through the augment), and a photo's plausible brightness
    pixels = x * std * 255 + mean * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3 and 40 < pixels.mean() < 220
    assert not torch.equal(x, preprocess(pre, jpegs, train=True))  # random per call
    assert "GpuPreprocess" in repr(pre)


def test_hflip_is_per_image():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)
    out = gpu.random_hflip(x, [True, False])
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[1], x[1])


def _photo_tensor(w: int, h: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(photo_jpeg(w, h, seed))))).permute(2, 0, 1).contiguous()


def test_batched_crops_match_per_image_resized_crops():
    """`resized_crops` (one padded batch, one grid_sample + k x k average) against torchvision's per-image
    resized_crop with bilinear antialiasing, on photos of mixed sizes (so boxes sit in a padded batch beside larger
    ones): the same pixels up to the resampling filter (mean abs diff < 1.5 levels, 99th percentile < 8); a wrong
    box, stretch or leaked padding would be tens of levels off. Flipping mirrors exactly; chunking changes nothing."""
    from torchvision.transforms.v2 import functional as F
    images = [_photo_tensor(w, h, s) for s, (w, h) in enumerate([(500, 375), (375, 500), (120, 90), (64, 200)])]
    boxes = [(10, 20, 300, 400), (100, 0, 400, 375), (5, 7, 40, 30), (50, 10, 120, 50)]  # down- and up-scaled
    ours = gpu.resized_crops(images, boxes, 64, [False] * 4)
    ref = torch.stack([F.resized_crop(img, *box, [64, 64], antialias=True) for img, box in zip(images, boxes)])
    diff = (ours.float() - ref.float()).abs()
    print(f"batched vs per-image crops: mean {diff.mean():.3f}, p99 {diff.quantile(0.99):.1f}, max {diff.max():.0f}")
    assert ours.shape == ref.shape == (4, 3, 64, 64) and ours.dtype == torch.uint8
    assert diff.mean() < 1.5 and diff.quantile(0.99) < 8
    flipped = gpu.resized_crops(images, boxes, 64, [True, False, True, False])
    assert torch.equal(flipped[0], ours[0].flip(-1)) and torch.equal(flipped[1], ours[1])
    assert torch.equal(flipped[2], ours[2].flip(-1))


def test_batched_crops_are_chunked_under_a_memory_budget(monkeypatch):
    images = [_photo_tensor(160, 120, s) for s in range(5)]
    boxes = [(0, 0, 120, 160), (10, 10, 50, 60), (0, 40, 100, 100), (20, 0, 90, 120), (0, 0, 30, 30)]
    whole = gpu.resized_crops(images, boxes, 32, [False, True, False, True, False])
    monkeypatch.setattr(gpu, "PAD_BYTES", 3 * 4 * 120 * 160)  # room for one padded image at a time
    assert gpu._chunks([(b[2], b[3]) for b in boxes], gpu.PAD_BYTES // 12) == [(i, i + 1) for i in range(5)]
    assert torch.equal(gpu.resized_crops(images, boxes, 32, [False, True, False, True, False]), whole)


def test_fixres_feed_is_the_eval_preprocessing_plus_a_flip():
    jpegs = [photo_jpeg(500, 375, s) for s in range(4)]
    pre, evaluated = feed.GpuPreprocess(PRE224, augment=False), preprocess(feed.GpuPreprocess(PRE224), jpegs, False)
    import random
    random.seed(3)
    flips = [random.random() < 0.5 for _ in jpegs]
    random.seed(3)
    trained = preprocess(pre, jpegs, train=True)
    assert any(flips) and not all(flips)
    for i, flip in enumerate(flips):
        assert torch.equal(trained[i], evaluated[i].flip(-1) if flip else evaluated[i])


def test_augmenter_policies():
    assert "AutoAugment" in repr(batch_augment.augmenter("original"))
    ra = batch_augment.augmenter("rand-m9-n3-mstd0.5")
    assert ra.num_ops == 3 and ra.magnitude == 9 and ra.num_magnitude_bins == 11
    assert "ColorJitter" in repr(batch_augment.augmenter(None))
