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
    """A params.yaml section. Each field's docstring is its description: the docs' reference page is generated from
    them (docs/gen.py), so every key says there what it does."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class VariantSpec(Section):
    """A params.yaml entry under `variants:`: a card ID or a compound-scaling phi."""

    model: str | None = None
    """A row of the model card (`effnet variants`), e.g. tf_efficientnet_b0. Give this or phi."""
    phi: float | None = Field(default=None, ge=-12, le=8)
    """Compound scaling of B0: width 1.1^phi, depth 1.2^phi, resolution 224 x 1.15^phi (0 is B0; -4 the demo's)."""
    teacher: str | None = None
    """Under `students:` only (Noisy Student): the variant key (of `variants:` or `students:`) whose published model
    pseudo-labels the unlabeled shards this student also trains on; a student can be the next one's teacher."""

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
    dataset: Literal["shapes", "digits"] = "shapes"
    """shapes: procedural shapes and textures, drawn here; digits: scikit-learn's 1,797 real 8x8 scans (inside its
    wheel), upscaled to image_size and split as its example does (first half train, second half val and test)."""
    classes: int = Field(default=10, ge=2, le=10)
    """Number of classes drawn."""
    train_per_class: int = Field(default=200, ge=1)
    """Training images per class (shapes only)."""
    val_per_class: int = Field(default=50, ge=1)
    """Validation images per class (shapes only)."""
    image_size: int = Field(default=96, ge=8)
    """Side of the square JPEGs written, in pixels."""
    labeled: float = Field(default=1.0, gt=0, le=1)
    """Share of each class's training images kept with their class; the rest go to unlabeled/ without it (a
    semi-supervised split, for Noisy Student). 1: every training image labeled, no unlabeled/."""
    seed: int = 0
    """Seed of the drawing (and of which training images stay labeled)."""


class ShardConfig(Section):
    samples_per_shard: int = Field(default=1000, ge=1)
    """Samples per webdataset tar."""
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    """Share of train held out as val (stratified, seeded) when the source has no val split."""
    shard_bytes: int | None = Field(default=None, ge=1)
    """Also cap each shard's size in bytes; null: by count only."""
    seed: int = 0
    """Order of the samples across shards."""
    max_side: int | None = Field(default=None, ge=16)
    """null: keep the JPEG bytes as they are; else shrink larger images to this side (re-encoded)."""
    quality: int = Field(default=95, ge=1, le=100)
    """JPEG quality of re-encoded images."""
    min_side: int = Field(default=8, ge=1)
    """Smaller images are rejected (1x1 pixels, icons)."""
    max_pixels: int = Field(default=89_478_485, ge=1)
    """Larger images are rejected as decompression bombs (PIL's bound)."""
    max_bad_fraction: float = Field(default=0.01, ge=0, le=1)
    """More rejected files than this share (rounded up to whole files) fail the stage."""
    workers: int | None = Field(default=None, ge=1)
    """Processes; null: all cores (the output is the same whatever the count)."""


def auto_workers() -> int:
    """`data.num_workers: auto` on this machine (the cores this process may use)."""
    return min(8, len(os.sched_getaffinity(0)))


class DataConfig(Section):
    source: str = "data/demo"
    """An ImageFolder with train/ (val/, test/ optional), or a CSV/TSV of path,label[,split]: what `shard` reads."""
    num_workers: int = Field(default="auto", ge=0, validate_default=True)
    """Loader processes decoding and augmenting images; 0: in the training process; auto: one per core, at most 8.
    Training on the CPU they run at nice 19, in the step's gaps (2 cores: 2 workers train 5-8 % faster than 1).
    With 1 or more, runs repeat bit for bit (the workers own the augmentations' RNG)."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _auto_workers(cls, value):
        return auto_workers() if value == "auto" else value
    shuffle_buffer: int = Field(default=1000, ge=0)
    """Samples in the training stream's shuffle buffer (per loader worker)."""
    holdout: float = Field(default=0.1, ge=0, lt=1)
    """Share of the train samples (chosen by a hash of their key) that no stage trains on: fixres chooses its
    resolution on them, never on val, which evaluate selects on; 0: none (fixres.img_size auto then falls back)."""
    decode: Literal["cpu", "gpu"] = "cpu"
    """cpu: loader workers decode and augment (portable). gpu: workers read the JPEG bytes only, the CUDA device
    decodes them in batches (nvjpeg), crops, flips, auto-augments and normalises them; without CUDA: one warning,
    then cpu."""
    hold_mb: int = Field(default=2048, ge=0)
    """A split measured many times (evaluate's sweep, fixres's choice, val each epoch) is decoded once and held in
    memory when its decoded images fit in this many MiB; the training split too, in each loader worker (they share
    the MiB), which then only augment after the first epoch. 0: always stream."""
    max_skipped: float = Field(default=0.01, ge=0, le=1)
    """Share of the training samples read that may be skipped because their shard went bad after sharding (a
    truncated tar, an image that no longer decodes): each is skipped and counted (data/skipped in MLflow); past
    this share the stage stops, naming the shard (judged against at least one epoch's samples)."""


class TrainConfig(Section):
    img_size: int | None = Field(default=None, ge=16)
    """Training resolution; null: the variant's own."""
    epochs: int = Field(default=10, ge=1)
    """Training epochs."""
    batch_size: int = Field(default=64, ge=1)
    """Images per device per step."""
    accumulate_grad_batches: int = Field(default=1, ge=1)
    """Lightning's gradient accumulation: global batch = batch_size x world size x this (the batch the LR scaling
    rule uses)."""
    lr: float | None = Field(default=None, gt=0)
    """null: the card's LR (0.256 at batch 2048; 0.128 for L2) scaled linearly to the global batch."""
    warmup_epochs: float = Field(default=1.0, ge=0)
    """Linear LR warm-up, in epochs (counted in optimizer steps)."""
    decay_epochs: float = Field(default=2.4, gt=0)
    """LR x decay_rate every this many epochs (the card's schedule)."""
    decay_rate: float = Field(default=0.97, gt=0, le=1)
    """The step decay's factor."""
    opt: str = "rmsproptf"
    """timm optimizer name (`create_optimizer_v2`): the card's rmsproptf (TF-style RMSProp), adamw, sgd, ..."""
    weight_decay: float | None = Field(default=None, ge=0)
    """null: the card's 1e-5 (not applied to BatchNorm and bias)."""
    label_smoothing: float | None = Field(default=None, ge=0, lt=1)
    """null: the card's 0.1."""
    mixup: float = Field(default=0.0, ge=0)
    """timm's Mixup alpha; 0: off (the card uses none)."""
    cutmix: float = Field(default=0.0, ge=0)
    """timm's CutMix alpha; 0: off."""
    mixup_prob: float = Field(default=1.0, ge=0, le=1)
    """How often a batch is mixed when mixup or cutmix is on."""
    mixup_switch_prob: float = Field(default=0.5, ge=0, le=1)
    """How often CutMix is taken instead of Mixup when both are on."""
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    """Mix per batch, per pair or per image."""
    random_erase: float = Field(default=0.0, ge=0, le=1)
    """timm's RandomErasing probability per image (reprob); 0: off."""
    random_erase_mode: Literal["const", "rand", "pixel"] = "pixel"
    """What an erased box is filled with."""
    random_erase_count: int = Field(default=1, ge=1)
    """At most this many boxes per image."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop's area range (the Inception/TF default)."""
    auto_augment: str | None = Field(default="original",
                                     pattern=r"^(original|originalr|v0|v0r|3a)$|^(rand|augmix)(-[a-z]+[0-9.]*)*$")
    """timm policy string: original (AutoAugment, the card's), rand-m9-mstd0.5 (RandAugment), augmix-... (CPU path
    only); null: none."""
    drop_rate: float | None = Field(default=None, ge=0, lt=1)
    """Dropout before the classifier; null: the variant's."""
    drop_path_rate: float | None = Field(default=None, ge=0, lt=1)
    """Stochastic depth; null: 1 - the card's survival probability (0.2)."""
    bn_momentum: float | None = Field(default=None, gt=0, lt=1)
    """BatchNorm momentum in TF terms (0.99 is PyTorch's 0.01); null: the card's 0.99."""
    pretrained: bool = False
    """Start from timm's hub weights (online)."""
    pretrained_file: str | None = None
    """Start from a local safetensors/.pth weights file (offline)."""
    accelerator: str = "auto"
    """Lightning's accelerator: auto, cpu, gpu, tpu (torch_xla's device: in the environment of requirements-xla.lock,
    docs/tpu.md)."""
    devices: int | str = 1
    """Devices per node, in any form Lightning takes: 2, -1, auto, "0,1"."""
    num_nodes: int = Field(default=1, ge=1)
    """Nodes; num_nodes x devices must match the processes a launcher starts."""
    strategy: str = "auto"
    """Lightning's strategy: auto, ddp, ..."""
    collective_timeout: int = Field(default=600, ge=1)
    """Seconds a collective (a gradient all-reduce, a barrier) may wait for the other ranks under ddp or fsdp before
    it fails: a rank that died or hangs stops the others within this, not PyTorch's 30 min. Give it the longest a
    healthy rank may lag (rank 0 writing a checkpoint, loader start-up)."""
    sync_bn: bool = False
    """BatchNorm statistics over the global batch under DDP (the TPU recipe's cross-replica BatchNorm)."""
    precision: str | None = None
    """Lightning's precision; null: bf16-mixed on GPU, bf16-true on TPU, 32 on CPU (bf16 is no faster there)."""
    channels_last: bool | Literal["auto"] = "auto"
    """Model and batches in NHWC; auto: on CUDA and CPU (1.5x+ on a CPU)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the model's forward; auto: on CUDA only (a CPU run would spend minutes compiling)."""
    seed: int = 0
    """Seed of the model init, the shard stream and the augmentations."""
    progress_bar: bool = True
    """The rich progress bar (a line per epoch is logged either way)."""
    log_every_n_steps: int = Field(default=50, ge=1)
    """Metrics to MLflow, and the NaN check (a host sync on a GPU), every this many steps."""
    ema_decay: float | None = Field(default=0.9999, gt=0, lt=1)
    """Exponential moving average of the weights, warmed up from 0: the model validated and exported; null: off."""
    checkpoint_every_n_steps: int | None = Field(default=1000, ge=1)
    """last.ckpt every this many optimizer steps, and at each epoch end; null: at epoch ends only."""
    checkpoint_dir: str = ".effnet/checkpoints"
    """Where last.ckpt is kept, per variant: outside the DVC output (DVC deletes outputs before a stage runs)."""
    resume: bool = True
    """Continue from the variant's last checkpoint (and its MLflow run) when one is there, made with the same
    params and data."""
    max_time: str | None = Field(default=None, pattern=r"^\d{2}:\d{2}:\d{2}:\d{2}$")
    """DD:HH:MM:SS, Lightning's time budget; null: none."""
    early_stop_patience: int | None = Field(default=None, ge=1)
    """Epochs without a better val top-1 before stopping (the best epoch's EMA is exported); null: off."""

    @model_validator(mode="after")
    def _pairs(self) -> TrainConfig:
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            raise ValueError(f"batch_size: {self.batch_size} is odd, and Mixup/CutMix pair each image with another "
                             "of the batch")
        return self


class FixResConfig(Section):
    img_size: Annotated[int, Field(ge=16)] | Literal["auto"] | None = "auto"
    """auto: the candidate resolution that scores best on the held-out training samples (data.holdout) once the
    BatchNorm statistics are re-estimated there; a number: that resolution; null: train resolution x scale."""
    scale: float = Field(default=1.15, gt=0)
    """Train resolution x this when no choice is made (too few held-out images, or img_size null)."""
    candidates: list[PositiveFloat] = Field(default=[1.0, 1.15, 1.3, 1.45, 1.6], min_length=1)
    """Resolutions tried by auto, as multiples of the train resolution."""
    min_holdout: int = Field(default=50, ge=1)
    """Fewer held-out images than this: no choice (auto falls back to scale), said in one line."""
    max_images: int = Field(default=1000, ge=1)
    """At most this many images per pass (BatchNorm re-estimation, scoring): 1000 estimate a BatchNorm's statistics
    well, over every spatial position."""
    epochs: int = Field(default=2, ge=1)
    """Fine-tuning epochs at the chosen resolution."""
    batch_size: int = Field(default=64, ge=1)
    """Images per step."""
    lr: float = Field(default=1e-2, gt=0)
    """SGD learning rate of the fine-tuning."""
    momentum: float = Field(default=0.9, ge=0, lt=1)
    """SGD momentum."""
    unfreeze: list[str] = []
    """More module names to fine-tune beyond the classifier and the last BatchNorm."""
    seed: int = 0
    """Seed of the fine-tuning's stream."""


class EvaluateConfig(Section):
    batch_size: int = Field(default=128, ge=1)
    """Images per forward pass."""
    sweep: list[PositiveFloat] = Field(default=[0.75, 0.875, 1.0, 1.15, 1.25, 1.5], min_length=1)
    """Resolutions measured, as multiples of the smaller model resolution (each model's own is always added): the
    candidates evaluate selects from and the accuracy-against-resolution plot."""


class RegistryConfig(Section):
    alias: str = "champion"
    """The alias of the published version: moved to a new version only when it beats the current one by margin."""
    challenger_alias: str = "challenger"
    """The alias a new version gets."""
    margin: float = Field(default=0.0, ge=0)
    """Top-1 points a new version must gain over the champion to take its alias."""
    promote_on_new_data: bool = False
    """A champion measured on other data (another fingerprint) is not comparable: false keeps it and leaves the new
    version challenger (the decision says why); true promotes the new version."""


class PredictConfig(Section):
    batch_size: int = Field(default=32, ge=1)
    """Images per forward pass."""
    num_workers: int = Field(default=2, ge=0)
    """Loader processes decoding images; 0: in the main process."""
    topk: int = Field(default=5, ge=1)
    """Classes per image (at most the model's)."""
    device: str = "auto"
    """auto: CUDA when there is a device, else the CPU; or any torch device (cpu, cuda:1)."""


class ExportConfig(Section):
    opset: int = Field(default=18, ge=13)
    """ONNX opset, pinned: an exporter's default moves with its version."""
    atol: float = Field(default=1e-4, gt=0)
    """Parity bound: the largest |logit difference| allowed, PyTorch against onnxruntime, fp32."""
    parity_images: int = Field(default=8, ge=1)
    """Images checked: the first of `effnet export --images`, else synthetic ones."""


class PseudoLabelConfig(Section):
    labels: Literal["soft", "hard"] = "soft"
    """soft: the teacher's class probabilities (the paper found them best); hard: its top class, one-hot."""
    threshold: float = Field(default=0.3, ge=0, lt=1)
    """Images whose top class probability is below this are left out (the paper's 0.3, for ImageNet's 1000
    classes)."""
    balance: bool = True
    """Per class (the teacher's top class), keep the per_class most confident images, and repeat images of a class
    that has fewer, so that every class counts alike (the paper's balancing)."""
    per_class: int | None = Field(default=None, ge=1)
    """Images per class after balancing; null: the mean of the classes' counts after the threshold."""
    batch_size: int = Field(default=128, ge=1)
    """Images per forward pass of the teacher."""


class StudentConfig(Section):
    ratio: float = Field(default=3.0, gt=0)
    """Pseudo-labeled (unlabeled) images per labeled image in every training batch of a student: of train.batch_size,
    round(batch_size / (1 + ratio)) are labeled, at least one (the paper takes 14:1 and more for its large
    students, whose unlabeled set is 300x the labeled one)."""
    auto_augment: str | None = Field(default="rand-n2-m27-mmax27",
                                     pattern=r"^(original|originalr|v0|v0r|3a)$|^(rand|augmix)(-[a-z]+[0-9.]*)*$")
    """The student's input noise, a timm policy string: the paper's RandAugment, 2 ops at magnitude 27 (mmax27
    lets 27 through timm's clamp at 10, the top of its scale); null: train.auto_augment."""
    drop_rate: float | None = Field(default=0.5, ge=0, lt=1)
    """Dropout before the classifier (the paper's 0.5); null: train.drop_rate."""
    drop_path_rate: float | None = Field(default=0.2, ge=0, lt=1)
    """Stochastic depth (the paper's survival probability 0.8 at the last block); null: train.drop_path_rate."""


class MlflowConfig(Section):
    experiment: str = "effnet"
    """The MLflow experiment every stage's run goes to."""


class Params(Section):
    """Every section of params.yaml."""

    variants: dict[str, VariantSpec] = Field(min_length=1)
    """The models to build, by key: dvc.yaml makes train@<key>, fixres@<key>, ... for each."""
    students: dict[str, VariantSpec] = {}
    """Noisy Student variants, by key, each naming its teacher: dvc.yaml makes pseudolabel@<key>, then
    train-student@<key>, fixres-student@<key>, evaluate-student@<key> and register-student@<key> (stages of their own:
    a student's training depends on its teacher's pseudo-labels, which a plain variant's has no file for)."""
    demo_data: DemoDataConfig = DemoDataConfig()
    """`effnet demo-data`: the built-in datasets."""
    data: DataConfig = DataConfig()
    """The data source and how every stage reads the shards."""
    shard: ShardConfig = ShardConfig()
    """`effnet shard`: ImageFolder or CSV to webdataset tars."""
    train: TrainConfig = TrainConfig()
    """`effnet train`: the card's recipe wherever a key is null."""
    fixres: FixResConfig = FixResConfig()
    """`effnet fixres`: the test resolution and the fine-tuning there."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """`effnet evaluate`: the resolution sweep."""
    registry: RegistryConfig = RegistryConfig()
    """`effnet register`: aliases and promotion."""
    predict: PredictConfig = PredictConfig()
    """`effnet predict`."""
    pseudolabel: PseudoLabelConfig = PseudoLabelConfig()
    """`effnet pseudolabel`: a teacher's labels for the unlabeled shards (Noisy Student)."""
    student: StudentConfig = StudentConfig()
    """How a student trains: the batch mix of labeled and pseudo-labeled images, and its noise."""
    export: ExportConfig = ExportConfig()
    """`effnet export`, and the ONNX file register stores with each version."""
    mlflow: MlflowConfig = MlflowConfig()
    """Where the runs go (the store: MLFLOW_TRACKING_URI, else mlflow.db in the workspace)."""

    @property
    def models(self) -> dict[str, VariantSpec]:
        """Every model by key: the variants, then the students."""
        return {**self.variants, **self.students}

    def variant(self, key: str) -> variants.Variant:
        if key not in self.models:
            raise EffnetError(f"variants.{key}: not in params (known: {', '.join(self.models)})")
        return self.models[key].resolve()

    def teachers(self, key: str) -> list[str]:
        """KEY's teachers, nearest first (empty for a plain variant): the chain of iterations behind a student."""
        chain = []
        while (teacher := self.models[key].teacher) is not None:
            chain.append(teacher)
            key = teacher
        return chain

    def check_students(self) -> None:
        """Each student names a teacher that is a variant key, the chain behind it ends at a plain variant (no loop),
        and it is at least as large as its teacher (width, depth, resolution): else one line naming the key."""
        for key, spec in self.variants.items():
            if spec.teacher is not None:
                raise EffnetError(f"variants.{key}.teacher: a student goes under students: (its training depends on "
                                  "its teacher's pseudo-labels: stages of its own)")
        for key in self.students:
            if key in self.variants:
                raise EffnetError(f"students.{key}: also a key of variants")
        for key, spec in self.students.items():
            if spec.teacher is None:
                raise EffnetError(f"students.{key}.teacher: missing (the variant key whose model labels the "
                                  "unlabeled images)")
            seen = [key]
            while (teacher := self.models[seen[-1]].teacher) is not None:
                if teacher not in self.models:
                    raise EffnetError(f"students.{seen[-1]}.teacher: {teacher!r} is not a variant key (known: "
                                      f"{', '.join(self.models)})")
                if teacher in seen:
                    raise EffnetError(f"students.{key}.teacher: the chain loops ({' -> '.join([*seen, teacher])})")
                seen.append(teacher)
            student, teacher = spec.resolve(), self.models[spec.teacher].resolve()
            smaller = [f"{k} {getattr(student, k):g} < {getattr(teacher, k):g}" for k in ("width", "depth", "img_size")
                       if getattr(student, k) < getattr(teacher, k)]
            if smaller:
                raise EffnetError(f"students.{key}: smaller than its teacher {spec.teacher} ({', '.join(smaller)}): "
                                  "a Noisy Student is equal to or larger than its teacher")


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
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise EffnetError(_one_line(e, str(path))) from None
    try:
        params.check_students()
    except EffnetError as e:
        raise EffnetError(f"{path}: {e}") from None
    return params


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
