"""torch.compile on the training path, checked on the CPU.

What TorchDynamo captures (graphs, graph breaks, the guards that decide when to compile again) does not depend on
the device, so the GPU run's compile behaviour is checked here with a backend that records the graphs it is given
and runs them as they are (no code generation). The GPU requirement: no graph breaks in the training step, no
recompilation between batches of one shape, and the FixRes resolution change compiling once more.

The compile call is the project's own (`Classifier(compile=True)`: `model.compile(dynamic=False)` in place, after
the EMA copy);
the `graphs` fixture only swaps the backend in. Inputs are channels_last under bf16 autocast (CPU autocast standing
in for CUDA's; the Lightning test runs the real `bf16-mixed` precision plugin on the CPU).

Shapes: with compile's default `dynamic=None`, Dynamo's automatic dynamic shapes compile a *second* size of a
dimension symbolically. For a changed batch size (the partial last validation batch) that is cheap, and one graph
then serves every batch size. For a changed resolution (height and width: FixRes continuing in the same process)
it is still one recompile, but tracing timm's 'same' padding symbolically took minutes for the tiny model on this
CPU (a static recompile: about a second), so `Classifier` compiles with `dynamic=False` (`STATIC`). FixRes's
exact-mean BatchNorm (`fixres.ExactMeanBatchNormAct2d`) keeps its running mean in tensors: timm's momentum=None
path reads a Python float and recompiled at every step.
"""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch._dynamo as dynamo
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from effnet import models, variants
from effnet.lightning import Classifier
from effnet.stages import fixres
from effnet.stages.fixres import TRAINABLE

CLASSES, BATCH, SIZE = 4, 8, 32
FIXRES_SIZE = round(SIZE * 1.25)  # a FixRes resolution
STATIC = dict(dynamic=False)
OPTIMIZER = dict(opt="momentum", lr=0.01, momentum=0.9, weight_decay=0.0)
FULL, PARTIAL = (BATCH, 3, SIZE, SIZE), (3, 3, SIZE, SIZE)


class Graphs:
    """A Dynamo backend that records every graph it is given and runs it eagerly. Per graph: the shape of the
    image input (a SymInt where Dynamo made a dimension dynamic: shown as "dyn") and whether it was captured with
    grad enabled (training) or not (validation, under inference_mode)."""

    def __init__(self):
        self.seen: list[tuple[tuple, bool]] = []
        self.calls: list[dict] = []  # the keyword arguments of each torch.compile call

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        x = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "l_x_"), None)  # forward(x)
        shape = None if x is None else tuple(d if isinstance(d, int) else "dyn" for d in x.meta["example_value"].shape)
        self.seen.append((shape, torch.is_grad_enabled()))  # shape None: a graph after a graph break
        return gm.forward

    def __len__(self) -> int:
        return len(self.seen)


@pytest.fixture
def graphs(monkeypatch):
    """torch.compile (which nn.Module.compile calls) with the recording backend; the caller's other arguments kept."""
    rec, real = Graphs(), torch.compile

    def compile(model=None, **kwargs):
        rec.calls.append(kwargs)
        return real(model, **{**kwargs, "backend": rec})

    monkeypatch.setattr(torch, "compile", compile)
    return rec


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """No compiled code, nor automatic-dynamic frame state, carried from one test to another."""
    dynamo.reset()
    yield
    dynamo.reset()


def tiny(variant: variants.Variant | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = models.build(variant or variants.resolve(phi=-6), CLASSES)  # conftest's tiny variant
    return model.to(memory_format=torch.channels_last)


def images(n: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size).to(memory_format=torch.channels_last)


def train_step(module: Classifier, opt: torch.optim.Optimizer, n: int = BATCH, size: int = SIZE) -> None:
    """What Lightning's training step does around the compiled forward (bf16-mixed): loss, backward, optimizer
    step, then the EMA update. (training_step itself needs a Trainer: the Lightning test runs it.)"""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.loss(module.model(images(n, size)), torch.randint(0, CLASSES, (n,)))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if module.ema is not None:
        module.ema.update(module.model)


def eval_forward(model: nn.Module, n: int = BATCH, size: int = SIZE) -> None:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images(n, size))


def fixres_setup(model: nn.Module) -> Classifier:
    """fixres.run's module around MODEL, bn2 left as it is: classifier and bn2 trainable and in train mode, the
    rest frozen in eval mode (as on_train_epoch_start leaves it)."""
    module = Classifier(model, CLASSES, OPTIMIZER, None, 0.0, trainable=TRAINABLE)
    module.train()
    module.on_train_epoch_start()
    assert model.bn2.training and model.classifier.training and not model.blocks.training
    return module


def run_fixres(tiny_params, tmp_path, compile: bool) -> Classifier:
    """The module the fixres stage fine-tunes (`fixres.prepare`) on a freshly trained-size bundle, as the pipeline
    runs it, with channels_last and train.compile forced on or off, in the train-epoch state Lightning puts it in."""
    model = tiny()
    variant = variants.resolve(phi=-6)
    spec = models.ModelSpec(variant="tiny", phi=-6, classes=[f"c{i}" for i in range(CLASSES)],
                            preprocessing=models.preprocessing(model, variant, SIZE))
    models.save_bundle(model, spec, tmp_path / "trained")
    train = tiny_params.train.model_copy(update={"compile": compile, "channels_last": True})
    params = tiny_params.model_copy(update={"train": train})
    tuning = fixres.prepare(params, *models.load_bundle(tmp_path / "trained"), FIXRES_SIZE)
    assert tuning.spec.img_size == FIXRES_SIZE
    module = tuning.module
    module.train()
    module.on_train_epoch_start()
    return module


def assert_one_graph(model: nn.Module, x: torch.Tensor) -> None:
    """torch._dynamo.explain: exactly one graph and no graph break (the reasons shown when there are)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if model.training:
            out = dynamo.explain(model)(x)
        else:
            with torch.inference_mode():
                out = dynamo.explain(model)(x)
    reasons = [f"{r.reason.splitlines()[0]} at {r.user_stack[-1] if r.user_stack else '?'}" for r in out.break_reasons]
    assert (out.graph_count, out.graph_break_count, reasons) == (1, 0, [])


# --- 1. no graph breaks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_is_one_graph_without_breaks(mode):
    assert_one_graph(tiny().train(mode == "train"), images(BATCH))


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tf_efficientnet_es"])  # MBConv + SE; EdgeTPU's EdgeResidual
def test_card_architectures_train_as_one_graph(name):
    assert_one_graph(tiny(variants.resolve(name)).train(), images(2, 64))


def test_fixres_frozen_setup_is_one_graph():
    """FixRes's mix of frozen eval-mode layers and a training classifier and bn2 (bn2 with a momentum): one graph."""
    model = tiny()
    fixres_setup(model)
    assert_one_graph(model, images(BATCH, FIXRES_SIZE))


def test_fixres_run_forward_is_one_graph(tiny_params, tmp_path, monkeypatch):
    module = run_fixres(tiny_params, tmp_path, compile=False)
    assert_one_graph(module.model, images(BATCH, FIXRES_SIZE))


# --- 2. no recompiles between batches of one shape ---------------------------------------------------------------

def test_one_compile_for_training_batches_of_one_shape(graphs):
    """As train.run builds it: optimizer steps, EMA updates and BatchNorm statistics (num_batches_tracked
    included) change between batches without a recompile; the compiled model in eval mode (validation without an
    EMA) is a second graph; back in train mode nothing compiles again. The EMA copy is not compiled."""
    model = tiny()
    module = Classifier(model, CLASSES, OPTIMIZER, None, 0.1, ema_decay=0.99, compile=True)
    assert graphs.calls == [STATIC]  # the model, once, static shapes; the EMA copy was made before
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = model.conv_stem.weight.detach().clone()
    for _ in range(4):
        train_step(module, opt)
    assert not torch.equal(before, model.conv_stem.weight) and int(model.bn1.num_batches_tracked) == 4
    assert graphs.seen == [(FULL, True)]

    module.eval()  # Lightning's validation: the whole LightningModule in eval mode, under inference_mode
    eval_forward(module.eval_model)  # the EMA: eager
    assert len(graphs) == 1
    eval_forward(module.model)
    eval_forward(module.model)
    assert graphs.seen[1:] == [(FULL, False)]

    module.train()
    for _ in range(2):
        train_step(module, opt)
    module.eval()
    eval_forward(module.model)
    assert len(graphs) == 2


def _loaders(n_train: int, n_val: int):
    def channels_last(batch):
        xs, ys = zip(*batch)
        return torch.stack(xs).contiguous(memory_format=torch.channels_last), torch.stack(ys)

    def with_keys(batch):
        return *channels_last(batch), [f"k{i}" for i in range(len(batch))]

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(n_train, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n_train,)))
    val = TensorDataset(torch.randn(n_val, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n_val,)))
    # As the shards' loaders batch: training drops the partial batch (partial=False), evaluation keeps it.
    return (DataLoader(train, BATCH, drop_last=True, collate_fn=channels_last),
            DataLoader(val, BATCH, collate_fn=with_keys))


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "no-ema"])
def test_lightning_fit_compiles_once_per_shape_and_mode(graphs, ema, tmp_path):
    """A real Trainer (bf16-mixed, sanity check, 2 epochs of 3 steps, validation ending on a partial batch).
    With the EMA (the default) validation runs the uncompiled EMA copy: one graph in all. Without it: the sanity
    check's eval graph, the training graph, and the partial validation batch's graph (batch dimension dynamic
    under compile's default, static with dynamic=False); the second epoch and validation compile nothing."""
    module = Classifier(tiny(), CLASSES, OPTIMIZER, None, 0.1, ema_decay=0.99 if ema else None, compile=True)
    train, val = _loaders(3 * BATCH, 2 * BATCH + 3)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few workers, small log interval
        trainer.fit(module, train, val)
    assert trainer.global_step == 6
    if ema:
        assert graphs.seen == [(FULL, True)]
    else:
        assert graphs.seen[:2] == [(FULL, False), (FULL, True)] and len(graphs) == 3
        (batch, *rest), grad = graphs.seen[2]
        assert (batch in (3, "dyn"), tuple(rest), grad) == (True, PARTIAL[1:], False)


# --- 3. the FixRes resolution change -----------------------------------------------------------------------------

def test_fixres_stage_compiles_once_at_its_resolution(graphs, tiny_params, tmp_path, monkeypatch):
    """The pipeline's FixRes: a process of its own compiling the trained model at round(SIZE * 1.25) in its frozen
    setup: one graph for its training batches, epoch after epoch."""
    module = run_fixres(tiny_params, tmp_path, compile=True)
    assert len(graphs.calls) == 1
    model = module.model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    frozen = model.conv_stem.weight.detach().clone()
    for _ in range(3):
        train_step(module, opt, size=FIXRES_SIZE)
    module.train()  # Lightning's next epoch: everything to train mode, then on_train_epoch_start re-freezes
    module.on_train_epoch_start()
    train_step(module, opt, size=FIXRES_SIZE)
    assert torch.equal(frozen, model.conv_stem.weight)
    assert graphs.seen == [((BATCH, 3, FIXRES_SIZE, FIXRES_SIZE), True)]


def test_resolution_change_in_one_process_compiles_once_more(graphs):
    """The same compiled model trained at SIZE, then FixRes's frozen setup at the FixRes size: exactly one more
    graph (static, with dynamic=False), none for further batches at that size."""
    model = tiny()
    module = Classifier(model, CLASSES, OPTIMIZER, None, 0.1, ema_decay=0.99)
    model.compile(**STATIC)  # as Classifier(compile=True) does, after the EMA copy
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        train_step(module, opt)
    assert len(graphs) == 1
    frozen = fixres_setup(model)  # new modes and requires_grad, new size: one recompile for both
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    for _ in range(3):
        train_step(frozen, opt, size=FIXRES_SIZE)
    frozen.train()
    frozen.on_train_epoch_start()
    train_step(frozen, opt, size=FIXRES_SIZE)
    assert graphs.seen == [(FULL, True), ((BATCH, 3, FIXRES_SIZE, FIXRES_SIZE), True)]


# --- 4. partial validation batches -------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic, expected", [
    (None, [FULL, ("dyn", 3, SIZE, SIZE)]),  # compile's default: the 2nd batch size makes the batch dim dynamic
    (False, [FULL, PARTIAL, (5, 3, SIZE, SIZE)]),  # one static graph per batch size
], ids=["default", "static"])
def test_partial_eval_batches(graphs, dynamic, expected):
    model = tiny().eval()
    model.compile(dynamic=dynamic)
    for n in (BATCH, BATCH, 3, 5, 3, BATCH):
        eval_forward(model, n)
    assert [shape for shape, _ in graphs.seen] == expected
