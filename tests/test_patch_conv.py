"""Patch embeddings as one matrix product (dvsft.models.patch_conv): the same numbers as PyTorch's own convolution.

The truth is ``nn.Conv3d`` itself, run on the same tensors in float64: outputs and the gradients of weight, bias
and input agree to rounding. The Qwen families' vision towers give the same features with the swapped layer, and
every way dvsft loads a model for training or evaluation swaps it.
"""

import copy

import pytest
import torch
from torch import nn

from dvsft.models.patch_conv import PatchConv3d, is_patch_conv, linear_patch_convs
from dvsft.testing.tiny import QWEN_TINY, TinyConfig, build_tiny


def _pair(kernel: tuple[int, int, int], channels: int = 3, out: int = 24) -> tuple[nn.Conv3d, nn.Conv3d]:
    torch.manual_seed(0)
    conv = nn.Conv3d(channels, out, kernel, stride=kernel).double()
    swapped = copy.deepcopy(conv)
    assert linear_patch_convs(swapped) == 1
    return conv, swapped


@pytest.mark.parametrize("kernel", [(2, 16, 16), (2, 14, 14), (1, 4, 6)])
def test_patch_input_matches_the_convolution_with_gradients(kernel):
    conv, swapped = _pair(kernel)
    assert type(swapped) is PatchConv3d and isinstance(swapped, nn.Conv3d)
    x = torch.randn(37, 3, *kernel, dtype=torch.float64)
    grad_out = torch.randn(37, 24, 1, 1, 1, dtype=torch.float64)
    results = []
    for module in (conv, swapped):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad_out)
        results.append((y, xi.grad, module.weight.grad, module.bias.grad))
    (y0, *g0), (y1, *g1) = results
    assert y1.shape == y0.shape == (37, 24, 1, 1, 1)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_other_input_takes_the_convolution_itself():
    conv, swapped = _pair((2, 4, 4))
    x = torch.randn(2, 3, 4, 8, 12, dtype=torch.float64)  # several windows: not one patch
    assert torch.equal(swapped(x), conv(x))


def test_only_patch_convolutions_change():
    model = nn.Sequential(
        nn.Conv3d(3, 8, (2, 4, 4), stride=(2, 4, 4)),  # a patch embedding
        nn.Conv3d(3, 8, 3, stride=1),  # overlapping windows
        nn.Conv3d(3, 8, 4, stride=4, padding=1),
        nn.Conv3d(4, 8, 2, stride=2, groups=2),
        nn.Conv3d(3, 8, 2, stride=2, dilation=2),
        nn.Conv2d(3, 8, 4, stride=4),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert linear_patch_convs(model) == 1
    assert [type(m).__name__ for m in model] == ["PatchConv3d", "Conv3d", "Conv3d", "Conv3d", "Conv3d", "Conv2d"]
    assert linear_patch_convs(model) == 0  # once is enough
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert is_patch_conv(nn.Conv3d(3, 8, 2, stride=2)) and not is_patch_conv(model[0])


@pytest.mark.parametrize("family", QWEN_TINY)
def test_qwen_vision_towers_give_the_same_features(family):
    from PIL import Image

    from dvsft.models.families import spec_for_model

    model, processor = build_tiny(TinyConfig(family=family))
    model = model.double().eval()
    spec = spec_for_model(model)
    page = Image.effect_noise((96, 64), 60).convert("RGB")
    inputs = processor.image_processor(images=[page], return_tensors="pt")
    inputs = {k: inputs[k] for k in spec.image_inputs if k in inputs}
    inputs["pixel_values"] = inputs["pixel_values"].double()
    reference = spec.vision_features(model, inputs)[0]
    assert linear_patch_convs(model) == 1, f"{family}: one patch embedding"
    swapped = spec.vision_features(model, inputs)[0]
    torch.testing.assert_close(swapped, reference, rtol=1e-10, atol=1e-10)


def test_every_model_dvsft_loads_uses_it(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from dvsft.models.loading import load_model
    from dvsft.training.config import DVSFTConfig
    from dvsft.training.model_setup import load_base

    def kinds(model):
        return {type(m).__name__ for m in model.modules() if isinstance(m, nn.Conv3d)}

    assert kinds(load_model(tiny_dir)) == {"PatchConv3d"}
    model, _ = load_base(DVSFTConfig(model=str(tiny_dir), data="unused.jsonl", output_dir=str(tmp_path)))
    assert kinds(model) == {"PatchConv3d"}
    model.save_pretrained(tmp_path / "saved")  # the checkpoint is the one the ordinary Conv3d makes
    saved, original = (load_file(d / "model.safetensors") for d in (tmp_path / "saved", tiny_dir))
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)
