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

from effnet import train
from effnet.data import gpu, stream, transforms

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
DC224 = dict(img_size=224, crop_pct=0.875, interpolation="bicubic", **IMAGENET)


def photo_jpeg(w: int, h: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine noise (as bench/common.py draws them)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    img = np.clip(np.asarray(coarse) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def batch_of(jpegs: list[bytes]):
    flat, sizes, *_ = gpu.collate_jpeg([(b, i) for i, b in enumerate(jpegs)])
    return flat, sizes


# --- fallback --------------------------------------------------------------------------------------------------

def test_resolve_decode_falls_back_to_cpu_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="effnet.data.gpu"):
        assert gpu.resolve_decode("cpu") == "cpu"
        assert not caplog.records
        assert gpu.resolve_decode("gpu", "auto") == "cpu"
    assert len(caplog.records) == 1 and "decoding and augmenting on the CPU" in caplog.records[0].getMessage()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # CUDA there, but the Trainer runs on a TPU
    assert gpu.resolve_decode("gpu", "tpu") == "cpu"
    assert gpu.resolve_decode("gpu", "auto") == "gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_train_with_decode_gpu_and_no_cuda_uses_the_cpu_path(tiny_params, shards_dir, workspace, monkeypatch,
                                                              caplog):
    seen = {}
    real_fit = train.fit

    def spy(module, dm, *args, **kwargs):
        seen["dm"] = dm
        return real_fit(module, dm, *args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    params = tiny_params.model_copy(update={"data": tiny_params.data.model_copy(update={"decode": "gpu"}),
                                            # channels_last forced on: a CPU run must take that too
                                            "train": tiny_params.train.model_copy(update={"channels_last": True})})
    with caplog.at_level(logging.WARNING, logger="effnet.data.gpu"):
        out = train.run(params, "tiny", shards_dir, workspace / "trained")
    warned = [r for r in caplog.records if r.name == "effnet.data.gpu"]
    assert len(warned) == 1 and "data.decode: gpu" in warned[0].getMessage()
    dm = seen["dm"]
    assert dm.decode == "cpu" and dm.gpu is None and dm.channels_last is True
    assert (out / "model.safetensors").is_file()


# --- the GPU path's functions on CPU tensors -------------------------------------------------------------------

class _Counting(gpu.GpuPreprocess):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = {"train": 0, "eval": 0}

    def train(self, flat, sizes, device):
        self.calls["train"] += 1
        return super().train(flat, sizes, device)

    def eval(self, flat, sizes, device):
        self.calls["eval"] += 1
        return super().eval(flat, sizes, device)


def test_lightning_steps_through_the_gpu_path_hooks_on_cpu(tiny_params, shards_dir, workspace):
    """The DataModule with decode='gpu' forced on a CPU Trainer: workers yield bytes, the hooks decode them on the
    batch's device, train batches get the train augment and val batches the eval preprocessing."""
    from effnet import models
    variant = tiny_params.variant("tiny")
    model = models.build(variant, 4)
    dc = models.data_config(model, variant, 32)
    pre = _Counting(dc, "original", (0.25, 1.0))
    dm = stream.ShardDataModule(shards_dir, None, None, 8, 0, 16, decode="gpu", gpu=pre)
    x, y = [], []

    class Grab(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, idx):
            x.append(batch[0])
            y.append(batch[1])

    module = train.Classifier(model, 4, dict(opt="sgd", lr=0.01), None, 0.0)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         num_sanity_val_steps=0, val_check_interval=2, callbacks=[Grab()])
    trainer.fit(module, datamodule=dm)
    assert pre.calls == {"train": 2, "eval": 1}
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


@pytest.mark.parametrize("dc", [DC224, dict(DC224, img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)])
def test_eval_preprocessing_matches_the_cpu_path(dc, shards_dir):
    """The GPU path's eval preprocessing (decode_jpeg + resize by crop pct + center crop, bicubic antialias) vs
    timm's eval transform on PIL-decoded images: photo-like JPEGs of ImageNet-like and odd sizes, up- and
    down-scaled, plus the demo shards' JPEGs."""
    jpegs = [photo_jpeg(w, h, seed) for seed, (w, h) in enumerate([(500, 375), (375, 500), (640, 427), (333, 251),
                                                                   (180, 120), (97, 61)])]
    flat, sizes, _, _ = next(iter(stream.eval_loader(shards_dir, None, 8, 0)))  # the loader's raw-bytes mode
    jpegs += [bytes(t.numpy()) for t in gpu.unpack(flat, sizes)]
    cpu_tf = transforms.eval_transform(dc)
    cpu = torch.stack([cpu_tf(stream.decode({"jpg": b})) for b in jpegs])
    ours = gpu.GpuPreprocess(dc).eval(*batch_of(jpegs), "cpu")
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype
    diff = (ours - cpu).abs()
    levels = diff * torch.tensor(dc["std"]).view(1, 3, 1, 1) * 255
    print(f"eval GPU path vs CPU path, size {dc['img_size']}: max abs diff {diff.max():.4f} (normalised), "
          f"{levels.max():.2f} levels of 255; mean abs diff {diff.mean():.5f}; "
          f"photos {diff[:6].max():.4f}, demo {diff[6:].max():.4f}")
    assert diff.max() <= EVAL_MAX_ABS and levels.max() <= 2.01 and levels.mean() < 0.05


@pytest.mark.parametrize("policy", ["original", transforms.RAND_AUGMENT, None])
def test_train_augment_batch_shape_dtype_and_normalisation(policy):
    dc = DC224
    jpegs = [photo_jpeg(500, 375, s) for s in range(6)] + [photo_jpeg(120, 200, 9)]
    pre = gpu.GpuPreprocess(dc, policy, (0.08, 1.0))
    torch.manual_seed(0)
    x = pre.train(*batch_of(jpegs), "cpu")
    assert x.shape == (7, 3, 224, 224) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
    mean, std = torch.tensor(dc["mean"]).view(1, 3, 1, 1), torch.tensor(dc["std"]).view(1, 3, 1, 1)
    assert (x >= -mean / std - 1e-5).all() and (x <= (1 - mean) / std + 1e-5).all()
    # back to 0..255: whole numbers (uint8 through the augment), and a photo's plausible brightness
    pixels = x * std * 255 + mean * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3 and 40 < pixels.mean() < 220
    assert not torch.equal(x, pre.train(*batch_of(jpegs), "cpu"))  # random per call
    assert "GpuPreprocess" in repr(pre)


def test_hflip_is_per_image():
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.uint8).view(2, 3, 2, 4)
    assert torch.equal(gpu.random_hflip(x, 1.0), x.flip(-1)) and torch.equal(gpu.random_hflip(x, 0.0), x)
    torch.manual_seed(0)
    flips = [torch.equal(gpu.random_hflip(x[:1].expand(64, -1, -1, -1), 0.5)[i], x[0].flip(-1)) for i in range(64)]
    assert 10 < sum(flips) < 54  # images of one batch flip independently


def test_augmenter_policies():
    assert "AutoAugment" in repr(gpu.augmenter("original"))
    ra = gpu.augmenter("rand-m9-n3-mstd0.5")
    assert ra.num_ops == 3 and ra.magnitude == 9 and ra.num_magnitude_bins == 11
    assert "ColorJitter" in repr(gpu.augmenter(None))
