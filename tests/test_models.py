"""Model-level behaviour every tool inherits: test-time flip averaging, also through ONNX Runtime."""

from __future__ import annotations

import torch

from foodvision.inference.engine import OnnxRuntimeModule
from foodvision.models.classifier import build_classifier


def tiny(test_time_flip: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _, _ = build_classifier(
        3,
        kind="scratch",
        name="tiny",
        image_size=32,
        scratch={"widths": [4, 8]},
        test_time_flip=test_time_flip,
    )
    return model


def test_test_time_flip_averages_image_and_mirror_in_eval_only() -> None:
    images = torch.rand(4, 3, 32, 32)
    plain, flipping = tiny(False).eval(), tiny(True).eval()
    flipping.load_state_dict(plain.state_dict())
    with torch.no_grad():
        expected = (plain(images) + plain(images.flip(-1))) / 2
        assert torch.allclose(flipping(images), expected, atol=1e-6)
        assert not torch.allclose(flipping(images), plain(images), atol=1e-4)  # the mirror really counts
        flipping.train()
        assert torch.allclose(flipping(images), plain.train()(images), atol=1e-6)  # training sees one view


def test_test_time_flip_survives_onnx_export() -> None:
    model = tiny(True).eval()
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    exported = OnnxRuntimeModule(model, images[:1])
    assert torch.allclose(exported(images), expected, atol=1e-4)
    assert not model.training
