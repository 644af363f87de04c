"""ONNX export: onnxruntime agrees with PyTorch (fp32, every top-1, logits within 1e-4) on the tiny model, b0 and L2
built at small odd resolutions where TF 'same' padding is asymmetric somewhere in the network (the known trap);
an export with the padding wrong is caught; the batch axis is dynamic; the file carries classes and preprocessing;
`effnet export` fails in one line and writes nothing; `register` stores the file with the version."""
from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from timm.layers import Conv2dSame
from timm.layers.padding import get_same_padding
from torch import nn

from effnet import cli, models, onnx_export, variants
from effnet.config import ExportConfig
from effnet.errors import EffnetError
from tests.test_predict import one_thread  # noqa: F401 - an autouse fixture

CFG = ExportConfig()


def built(name: str, size: int, classes: int = 10) -> tuple[nn.Module, models.ModelSpec]:
    """A model with random weights, calibrated to behave like a trained one on the export's parity images."""
    variant = variants.resolve(None, -6) if name == "tiny" else variants.resolve(name, None)
    torch.manual_seed(0)
    model = models.build(variant, classes)
    spec = models.ModelSpec(variant=name, model=None if variant.phi is not None else name, phi=variant.phi,
                            classes=[f"c{i}" for i in range(classes)],
                            preprocessing=models.preprocessing(model, variant, size))
    parity = onnx_export.synthetic(CFG.parity_images, size)  # what export checks on: last, so logits fit it
    batches = [onnx_export.synthetic(8, size, seed) for seed in (1, 2)] + [parity]
    return models.calibrate(model, [onnx_export.normalised(spec, b) for b in batches]), spec


def asymmetric_pads(model: nn.Module, size: int) -> int:
    """How many 'same'-padded convolutions pad unevenly (one pixel more after than before) at input SIZE."""
    uneven = []

    def hook(conv, inputs, _):
        pad = get_same_padding(inputs[0].shape[-1], conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        uneven.append(pad % 2)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return sum(uneven)


def symmetric_copy(model: nn.Module) -> nn.Module:
    """MODEL with every 'same' convolution padded symmetrically instead: what an exporter that gets TF padding
    wrong would produce (right wherever the padding is even, off by a pixel where it is not)."""
    wrong = copy.deepcopy(model)
    for parent in list(wrong.modules()):
        for name, conv in parent.named_children():
            if isinstance(conv, Conv2dSame):
                plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                  conv.kernel_size[0] // 2, conv.dilation, conv.groups, conv.bias is not None)
                plain.load_state_dict(conv.state_dict())
                setattr(parent, name, plain)
    return wrong


def onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {onnx_export.INPUT: x.numpy()})[0]


@pytest.mark.parametrize("name, size", [
    ("tiny", 37), ("tf_efficientnet_b0", 45),
    # 480 M parameters: ~2 min to build and calibrate, ~1.5 min to export, 10 GB (`make test-all`).
    pytest.param("tf_efficientnet_l2_ns_475", 45, marks=pytest.mark.slow),
])
def test_onnx_matches_pytorch_where_same_padding_is_asymmetric(name, size, tmp_path):
    model, spec = built(name, size)
    assert asymmetric_pads(model, size) > 0, "the size must exercise TF 'same' padding's uneven case"
    result = onnx_export.export(model, spec, tmp_path / "m.onnx", CFG)
    parity = result.parity
    print(f"{name} @ {size}px: {parity}")  # the figures, for the record (-s)
    assert parity.images == CFG.parity_images == parity.top1_agree and parity.max_abs_diff < CFG.atol
    assert parity.max_abs_logit > 1, "logits at a trained model's scale, or the bound would mean nothing"
    x = onnx_export.normalised(spec, onnx_export.synthetic(3, size, seed=7))
    with torch.inference_mode():
        expected = model(x).numpy()
    for batch in (x[:1], x):  # the batch axis is dynamic
        np.testing.assert_allclose(onnx_logits(result.path, batch), expected[:len(batch)], atol=CFG.atol, rtol=0)


@pytest.mark.parametrize("name, size", [("tiny", 37), ("tf_efficientnet_b0", 45)])
def test_the_check_catches_an_export_with_the_padding_wrong(name, size, tmp_path):
    model, spec = built(name, size)
    x = onnx_export.normalised(spec, onnx_export.synthetic(CFG.parity_images, size))
    onnx_export.to_onnx(symmetric_copy(model), x[:1], tmp_path / "wrong.onnx", CFG.opset)
    with pytest.raises(EffnetError, match="parity check failed") as failed:
        onnx_export.check(model, tmp_path / "wrong.onnx", x, CFG.atol)
    print(failed.value)


def test_export_command_writes_a_self_describing_file_or_nothing(pipeline, tmp_path, capsys):
    """The pipeline's trained model, checked on its own val images."""
    bundle, out = pipeline.repo / "models/tiny/fixres", tmp_path / "tiny.onnx"
    argv = ["export", str(bundle), str(out), "--images", str(pipeline.repo / "data/demo/val")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    reported = json.loads(capsys.readouterr().out)
    print(f"trained tiny on its val images: {reported['parity']}")
    _, spec = models.load_bundle(bundle)
    assert reported["parity"]["images"] == CFG.parity_images
    assert reported["input_shape"] == ["batch", 3, spec.img_size, spec.img_size]
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == spec.classes
    assert models.Preprocessing.model_validate_json(meta["preprocessing"]) == spec.preprocessing
    assert json.loads(meta["parity"]) == reported["parity"] and meta["opset"] == str(CFG.opset)
    assert onnx.load(str(out)).opset_import[0].version == CFG.opset
    for argv, culprit in [(["no/such/model", str(tmp_path / "x.onnx")], "no/such/model"),
                          ([str(bundle), str(tmp_path / "x.onnx"), "--images", "no/such/images"], "no/such/images"),
                          ([str(bundle), str(tmp_path / "x.onnx"), "--set", "export.atol=1e-12"], "parity check")]:
        assert cli.main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and culprit in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"], "a failed export leaves nothing"


def test_register_stores_the_checked_onnx_file_with_the_version(pipeline, tmp_path):
    import mlflow
    mlflow.set_tracking_uri(pipeline.tracking_uri)
    folder = mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny@champion", dst_path=str(tmp_path))
    path = tmp_path / folder / "artifacts" / onnx_export.FILE
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    model, spec = models.load_bundle(pipeline.published(tmp_path / "published"))
    assert json.loads(meta["classes"]) == spec.classes and json.loads(meta["parity"])["max_abs_diff"] < CFG.atol
    x = onnx_export.normalised(spec, onnx_export.synthetic(4, spec.img_size, seed=3))
    with torch.inference_mode():
        np.testing.assert_allclose(onnx_logits(path, x), model(x).numpy(), atol=CFG.atol, rtol=0)
