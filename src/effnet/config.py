"""Typed params: one pydantic model per params.yaml section, validated before any stage does work.

`load(path, overrides)` reads params.yaml, applies `section.key=value` overrides (values parsed as YAML) and
returns `Params`; any unknown key, wrong type or unknown variant raises EffnetError naming the key.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from effnet import variants
from effnet.errors import EffnetError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VariantSpec(Section):
    """A params.yaml entry under `variants:`: a card ID or a compound-scaling phi."""

    model: str | None = None
    phi: float | None = Field(default=None, ge=-12, le=8)

    @model_validator(mode="after")
    def _known(self) -> VariantSpec:
        try:  # unknown card ID, or both/neither given: fail at load, naming the key, not mid-pipeline
            self.resolve()
        except EffnetError as e:
            raise ValueError(str(e)) from None
        return self

    def resolve(self) -> variants.Variant:
        return variants.resolve(self.model, self.phi)


class DemoDataConfig(Section):
    # shapes: procedural (drawn here); digits: scikit-learn's 1,797 real 8x8 scans (inside its wheel), upscaled to
    # image_size, split as its example does: first half train, second half val and test (alternately)
    dataset: Literal["shapes", "digits"] = "shapes"
    classes: int = Field(default=10, ge=2, le=10)
    train_per_class: int = Field(default=200, ge=1)  # shapes only
    val_per_class: int = Field(default=50, ge=1)  # shapes only
    image_size: int = Field(default=96, ge=8)
    seed: int = 0


class ShardConfig(Section):
    samples_per_shard: int = Field(default=1000, ge=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)  # held out of train (stratified) when there is no val split
    shard_bytes: int | None = Field(default=None, ge=1)  # also cap each shard's size in bytes; None: count only
    seed: int = 0  # order of samples across shards
    max_side: int | None = Field(default=None, ge=16)  # None: keep JPEG bytes; else shrink larger images to it
    quality: int = Field(default=95, ge=1, le=100)  # JPEG quality of re-encoded images
    min_side: int = Field(default=8, ge=1)  # smaller images are rejected (1x1 pixels, icons)
    max_pixels: int = Field(default=89_478_485, ge=1)  # larger images are rejected as decompression bombs (PIL's)
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)  # more rejects (rounded up to files) fail the stage
    workers: int | None = Field(default=None, ge=1)  # processes; None: all cores (does not change the output)


def auto_workers() -> int:
    """`data.num_workers: auto` on this machine (the cores this process may use)."""
    return min(8, len(os.sched_getaffinity(0)))


class DataConfig(Section):
    source: str = "data/demo"  # an ImageFolder with train/ (val/, test/ optional) or a CSV/TSV of path,label[,split]
    # loader processes decoding and augmenting images (0: in the training process). auto: one per core, at most 8.
    # Training on the CPU they run at nice 19, in the step's gaps (2 cores: 2 workers 5-8 % faster than 1, 1.15x
    # 0 workers: bench/cpu_bench.py)
    num_workers: int = Field(default_factory=auto_workers, ge=0)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_workers(cls, value):
        return auto_workers() if value == "auto" else value
    shuffle_buffer: int = Field(default=1000, ge=0)
    # share of the train samples (chosen by a hash of their key) that no stage trains on: fixres chooses its
    # resolution on them (never on val, which evaluate selects on); 0: none (fixres.img_size auto then falls back)
    holdout: float = Field(default=0.1, ge=0, lt=1)
    # cpu: workers decode and augment (portable). gpu: workers read JPEG bytes only; the CUDA device decodes them
    # in batches (nvjpeg) and crops, flips, auto-augments and normalises them; without CUDA: one warning, cpu.
    decode: Literal["cpu", "gpu"] = "cpu"
    # a split a stage measures many times (evaluate's sweep, fixres's resolution choice, val each epoch) is decoded
    # once and held in memory when its decoded images fit in this many MiB; each pass then only resizes and crops.
    # The training split too, in each loader worker, which then only augments after the first epoch (the workers
    # share the MiB). 0: always stream
    hold_mb: int = Field(default=2048, ge=0)
    # share of the training samples read that may be skipped because their shard went bad after sharding (a
    # truncated tar, an image that no longer decodes): each is skipped and counted (data/skipped in MLflow), and
    # past this share the stage stops, naming the shard (judged against at least one epoch's samples)
    max_skipped: float = Field(default=0.01, ge=0, le=1)


class TrainConfig(Section):
    img_size: int | None = Field(default=None, ge=16)  # None: the variant's own
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)  # per device
    # Lightning's gradient accumulation: global batch = batch_size x world size x this (the LR scaling rule's batch)
    accumulate_grad_batches: int = Field(default=1, ge=1)
    lr: float | None = Field(default=None, gt=0)  # None: the card's LR scaled linearly to the global batch
    warmup_epochs: float = Field(default=1.0, ge=0)
    decay_epochs: float = Field(default=2.4, gt=0)  # LR *= decay_rate every decay_epochs (the card's schedule)
    decay_rate: float = Field(default=0.97, gt=0, le=1)
    opt: str = "rmsproptf"
    weight_decay: float | None = Field(default=None, ge=0)  # None: the card's
    label_smoothing: float | None = Field(default=None, ge=0, lt=1)
    # timm's regularisers, off by default (the card uses none): Mixup/CutMix alphas (0: off), how often a batch is
    # mixed, how often CutMix is taken instead of Mixup when both are on, and per batch / pair / image
    mixup: float = Field(default=0.0, ge=0)
    cutmix: float = Field(default=0.0, ge=0)
    mixup_prob: float = Field(default=1.0, ge=0, le=1)
    mixup_switch_prob: float = Field(default=0.5, ge=0, le=1)
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    random_erase: float = Field(default=0.0, ge=0, le=1)  # probability per image (timm's reprob); 0: off
    random_erase_mode: Literal["const", "rand", "pixel"] = "pixel"
    random_erase_count: int = Field(default=1, ge=1)  # at most this many boxes per image
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (Inception/TF default)
    # timm policy string: 'original' (the card's), 'rand-m9-mstd0.5', 'augmix-...' (CPU path only), None
    auto_augment: str | None = Field(default="original",
                                     pattern=r"^(original|originalr|v0|v0r|3a)$|^(rand|augmix)(-[a-z]+[0-9.]*)*$")
    drop_rate: float | None = Field(default=None, ge=0, lt=1)  # None: the variant's dropout
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1)  # None: 1 - the card's survival prob
    bn_momentum: float | None = Field(default=None, gt=0, lt=1)  # TF terms (0.99); None: the card's
    pretrained: bool = False  # timm hub weights (online)
    pretrained_file: str | None = None  # local safetensors/.pth weights (offline)
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = Field(default=1, ge=1)
    strategy: str = "auto"
    # seconds a collective (a gradient all-reduce, a barrier) may wait for the other ranks under ddp (or fsdp) before
    # it fails: a rank that died or hangs stops the others within this, not PyTorch's 30 min. Give it the longest
    # a healthy rank may lag: rank 0 writing a checkpoint, loader start-up
    collective_timeout: int = Field(default=600, ge=1)
    sync_bn: bool = False  # BatchNorm statistics over the global batch under DDP (the TPU recipe's cross-replica BN)
    # null/auto: chosen per device from measurement (lightning.AUTO), and logged
    precision: str | None = None  # None: bf16-mixed on GPU, bf16-true on TPU, 32 on CPU
    channels_last: bool | Literal["auto"] = "auto"  # model and batches in NHWC; auto: on CUDA and CPU
    compile: bool | Literal["auto"] = "auto"  # torch.compile the trained model's forward; auto: on CUDA only
    seed: int = 0
    progress_bar: bool = True
    log_every_n_steps: int = Field(default=50, ge=1)  # metrics to MLflow (and the NaN check: a host sync) this often
    ema_decay: float | None = Field(default=0.9999, gt=0, lt=1)  # EMA of the weights (validated, exported); None: off
    checkpoint_every_n_steps: int | None = Field(default=1000, ge=1)  # plus one at each epoch end; None: epochs only
    checkpoint_dir: str = ".effnet/checkpoints"  # outside the DVC out (DVC deletes outs before a stage runs)
    resume: bool = True  # continue from the variant's last checkpoint (and its MLflow run) if one is there
    max_time: str | None = Field(default=None, pattern=r"^\d{2}:\d{2}:\d{2}:\d{2}$")  # DD:HH:MM:SS; None: no limit
    early_stop_patience: int | None = Field(default=None, ge=1)  # epochs without a better val top-1; None: off

    @model_validator(mode="after")
    def _pairs(self) -> TrainConfig:
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise ValueError(f"batch_size: {self.batch_size} is odd, and Mixup/CutMix pair each image with another "
                             "of the batch")
        return self


class FixResConfig(Section):
    # auto: the candidate resolution that scores best on the training samples held out of training (data.holdout)
    # once the BatchNorm statistics are re-estimated there; a number: that resolution; None: train res * scale
    img_size: Annotated[int, Field(ge=16)] | Literal["auto"] | None = "auto"
    scale: float = Field(default=1.15, gt=0)
    candidates: list[PositiveFloat] = Field(default=[1.0, 1.15, 1.3, 1.45, 1.6], min_length=1)  # auto: x train res
    min_holdout: int = Field(default=50, ge=1)  # fewer held-out images: no choice (auto falls back to the scale)
    # at most this many images per pass (BatchNorm re-estimation, scoring): 1000 estimate a BatchNorm's statistics
    # well (and over every spatial position), and the demo's choice takes half the time it took with all 2,160
    max_images: int = Field(default=1000, ge=1)
    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    unfreeze: list[str] = []  # more module names to fine-tune beyond the classifier and last BatchNorm
    seed: int = 0


class EvaluateConfig(Section):
    batch_size: int = Field(default=128, ge=1)
    # Resolutions swept for the accuracy-vs-resolution plot, as multiples of the smallest model's resolution
    # (every model's own resolution is always included).
    sweep: list[PositiveFloat] = Field(default=[0.75, 0.875, 1.0, 1.15, 1.25, 1.5], min_length=1)


class RegistryConfig(Section):
    alias: str = "champion"  # moved to a new version only when it beats the current one by `margin`
    challenger_alias: str = "challenger"
    margin: float = Field(default=0.0, ge=0)  # top-1 points
    # A champion measured on other val data (another fingerprint) is not comparable: False keeps it and leaves
    # the new version challenger (the decision says why); True promotes the new version.
    promote_on_new_data: bool = False


class PredictConfig(Section):
    batch_size: int = Field(default=32, ge=1)
    num_workers: int = Field(default=2, ge=0)  # loader processes decoding images; 0: in the main process
    topk: int = Field(default=5, ge=1)  # classes per image (at most the model's)
    device: str = "auto"  # auto: CUDA when there is a device, else the CPU; or any torch device ("cpu", "cuda:1")


class ExportConfig(Section):
    opset: int = Field(default=18, ge=13)  # ONNX opset, pinned: an exporter's default moves with its version
    atol: float = Field(default=1e-4, gt=0)  # parity bound: max |logit difference|, PyTorch vs onnxruntime, fp32
    parity_images: int = Field(default=8, ge=1)  # images checked (synthetic, or the first of `effnet export --images`)


class MlflowConfig(Section):
    experiment: str = "effnet"


class Params(Section):
    variants: dict[str, VariantSpec] = Field(min_length=1)
    demo_data: DemoDataConfig = DemoDataConfig()
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    train: TrainConfig = TrainConfig()
    fixres: FixResConfig = FixResConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    predict: PredictConfig = PredictConfig()
    export: ExportConfig = ExportConfig()
    mlflow: MlflowConfig = MlflowConfig()

    def variant(self, key: str) -> variants.Variant:
        if key not in self.variants:
            raise EffnetError(f"variants.{key}: not in params (known: {', '.join(self.variants)})")
        return self.variants[key].resolve()


def _override(raw: dict, assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise EffnetError(f"--set {assignment!r}: expected section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise EffnetError(f"--set {key}: '{part}' is not a section")
    node[leaf] = yaml.safe_load(value)


def _one_line(err: ValidationError, source: str, section: str | None = None) -> str:
    """The first error, naming its key; a section's own check names the key it is about as `key: message`."""
    first = err.errors()[0]
    # union members add their type to the location (fixres.img_size.constrained-int): keep the field names only
    loc = ([section] if section else []) + [p for p in first["loc"] if not any(c in str(p) for c in "-[(")]
    key = ".".join(str(p) for p in loc)
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and (named := re.match(r"^(\w+): ", msg)):
        key, msg = f"{key}.{named[1]}", msg[named.end():]
    return f"{source}: {key}: {msg}{more}"


def _read(path: Path) -> dict:
    if not path.is_file():
        raise EffnetError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise EffnetError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise EffnetError(f"{path}: expected a mapping of sections")
    return raw


def load(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    path = Path(path)
    raw = _read(path)
    for assignment in overrides:
        _override(raw, assignment)
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise EffnetError(_one_line(e, str(path))) from None


def load_section(name: str, path: str | Path = "params.yaml", overrides: list[str] = (),
                 optional: bool = True) -> Section:
    """Section NAME alone, for a command that also runs outside a workspace (predict, export): read from PATH when
    it is there (or when not OPTIONAL), else the defaults; --set overrides of this section apply either way."""
    path = Path(path)
    read = path.is_file() or not optional
    raw = _read(path) if read else {}
    for assignment in overrides:
        if not assignment.startswith(f"{name}."):
            raise EffnetError(f"--set {assignment.partition('=')[0]}: `effnet {name}` reads only the {name} section")
        _override(raw, assignment)
    try:
        return Params.model_fields[name].annotation.model_validate(raw.get(name) or {})
    except ValidationError as e:
        raise EffnetError(_one_line(e, str(path) if read else "--set", name)) from None
