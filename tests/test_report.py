"""report.html (eval.py) and leaderboard.html (compare.py): self-contained pages whose numbers are the files'."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from foodvision.cli.export import export
from foodvision.evaluation.evaluate import evaluate
from foodvision.evaluation.report import cam_target_layer
from foodvision.inference.checkpoints import load_checkpoint_model
from foodvision.models.classifier import build_classifier
from foodvision.runs.compare import compare

from .conftest import TinyRun, compose_tool


class Page(HTMLParser):
    """Every tag with its attributes, and the text inside elements carrying data-* keys."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.open: list[str] = []
        self.text: list[str] = []
        self.texts: dict[int, list[str]] = {}
        self.stack: list[int] = []
        self.feed(text)
        self.close()

    VOID = {"img", "meta", "br", "link", "input", "hr"}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        if tag not in self.VOID:
            self.open.append(tag)
            self.stack.append(len(self.tags) - 1)
            self.texts[len(self.tags) - 1] = []

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for index in self.stack:
            self.texts[index].append(data)

    def inner(self, index: int) -> str:
        return "".join(self.texts.get(index, [])).strip()

    def find(self, tag: str | None = None, **attrs: str) -> list[tuple[int, dict[str, str]]]:
        return [
            (i, a)
            for i, (t, a) in enumerate(self.tags)
            if (tag is None or t == tag) and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_self_contained(page: Page) -> None:
    assert not page.open, f"unclosed tags: {page.open}"
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    for _, attrs in page.tags:
        for key in ("src", "href"):
            assert not attrs.get(key) or attrs[key].startswith("data:"), attrs[key][:80]


@pytest.fixture(scope="module")
def evaluated(tiny_run: TinyRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "eval"
    evaluate(compose_tool("eval", f"ckpt_path={tiny_run.checkpoint}", f"output_dir={out}", "precision=32"))
    return out


def test_report_embeds_every_figure_names_every_class_and_repeats_the_metrics(
    evaluated: Path, tiny_run: TinyRun
) -> None:
    text = (evaluated / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert_self_contained(page)
    metrics = json.loads((evaluated / "metrics.json").read_text())

    # every figure eval.py wrote, byte for byte
    sources = [a["src"] for _, a in page.find("img")]
    for figure in ("curves.png", "confusion_matrix.png", "most_confident_wrong.png"):
        assert (
            f"data:image/png;base64,{base64.b64encode((evaluated / figure).read_bytes()).decode()}" in sources
        )

    # headline numbers: the exact values of metrics.json, shown rounded
    cards = {a["data-metric"]: (i, a) for i, a in page.find() if "data-metric" in a}
    names = ("acc", "acc_top5", "loss", "precision_macro", "recall_macro", "f1_macro", "f1_weighted")
    assert set(cards) == {f"test/{name}" for name in names}
    for key, (index, attrs) in cards.items():
        assert float(attrs["data-value"]) == metrics[key]
        shown = page.inner(index)
        expected = (
            f"{100 * metrics[key]:.2f} %" if key in ("test/acc", "test/acc_top5") else f"{metrics[key]:.4f}"
        )
        assert shown == expected, key

    # every class, with the per_class.csv numbers
    rows = {a["data-class"]: i for i, a in page.find("tr") if "data-class" in a}
    assert sorted(rows) == sorted(tiny_run.classes)
    values = [(a["data-key"], a["data-value"]) for _, a in page.find("td") if "data-key" in a]
    expected_values = [
        (key, row[key])
        for row in read_csv(evaluated / "per_class.csv")
        for key in ("precision", "recall", "f1")
    ]
    assert values == expected_values

    # model facts: parameters of the checkpoint, measured latency
    model, _, _ = load_checkpoint_model(tiny_run.checkpoint)
    params = [a for _, a in page.find("span") if a.get("data-key") == "parameters"]
    assert int(params[0]["data-value"]) == sum(p.numel() for p in model.parameters())
    assert "ms per photo" in text and "images/s" in text

    # Grad-CAM: correct and wrong photos, each its input crop and the heat map, decodable images
    correct = page.find("div", id="gradcam-correct")
    wrong = page.find("div", id="gradcam-wrong")
    assert correct and wrong
    cams = [a["src"] for _, a in page.find("img") if a.get("alt", "").startswith("Grad-CAM for")]
    n_wrong = len(read_csv(evaluated / "most_confident_wrong.csv"))
    right = {r["true"] for r in read_csv(evaluated / "predictions.csv") if r["true"] == r["predicted"]}
    assert len(cams) == min(6, len(right)) + min(6, n_wrong) > 0
    for src in cams:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.size == (160, 160) and image.mode == "RGB"


def test_report_of_an_exported_model_explains_why_there_is_no_gradcam(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    model_file = tmp_path / "model.onnx"
    export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=onnx", f"output={model_file}"))
    out = tmp_path / "eval"
    evaluate(
        compose_tool(
            "eval",
            f"ckpt_path={model_file}",
            f"output_dir={out}",
            f"data.root={tiny_run.data_root}",
            "data=imagefolder",
        )
    )
    text = (out / "report.html").read_text()
    assert_self_contained(Page(text))
    assert "Grad-CAM needs the training checkpoint" in text
    assert "curves.png was not written" in text  # a lone exported file has no TensorBoard events


def test_gradcam_layer_of_a_timm_backbone_is_its_last_feature_map() -> None:
    model, _, _ = build_classifier(3, name="mobilenetv2_100", pretrained=False)
    assert cam_target_layer(model, 64) is model.backbone.bn2


def test_gradcam_without_the_graph_below_its_layer_gives_the_maps_of_a_full_backward() -> None:
    """report.py cuts autograd at the Grad-CAM layer (memory): the maps stay those of the grad-cam package on
    the whole network, and the network is left as it was found."""
    pytest.importorskip("pytorch_grad_cam")
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from foodvision.evaluation.report import gradcam_maps

    torch.manual_seed(0)
    model, _, _ = build_classifier(3, name="mobilenetv2_100", pretrained=False)
    model.eval()
    network = torch.nn.Sequential(model.backbone, model.head)
    layer = cam_target_layer(model, 64)
    # a frozen weight stays frozen, the others trainable
    model.backbone.conv_stem.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in network.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 64, generator=generator) for _ in range(3)]
    targets = [0, 2, 1]
    with GradCAM(model=network, target_layers=[layer]) as cam:
        expected = [
            cam(input_tensor=image[None], targets=[ClassifierOutputTarget(t)])[0]
            for image, t in zip(images, targets, strict=True)
        ]
    network.zero_grad(set_to_none=True)
    got = gradcam_maps(network, layer, images, targets)
    assert any(float(m.max()) > 0 for m in expected)
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    assert {name: p.requires_grad for name, p in network.named_parameters()} == flags
    assert all(p.grad is None for p in network.parameters())  # nothing below or above accumulated gradients
    assert not any(m.training for m in network.modules())


def test_report_draws_gradcam_with_the_model_eval_holds(
    tiny_run: TinyRun, evaluated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second copy of the model for Grad-CAM: eval's predictor's PyTorch model is used (also behind ONNX
    Runtime), and left as it was."""
    pytest.importorskip("pytorch_grad_cam")
    import foodvision.inference.checkpoints
    from foodvision.evaluation.report import gradcam_overlays, pick_samples
    from foodvision.inference.predictor import Predictor

    predictor = Predictor(tiny_run.checkpoint, device="cpu", precision="32")
    flags = [p.requires_grad for p in predictor.model.parameters()]

    def no_second_copy(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("Grad-CAM loaded the checkpoint a second time")

    monkeypatch.setattr(foodvision.inference.checkpoints, "load_checkpoint_model", no_second_copy)
    samples = pick_samples(
        read_csv(evaluated / "predictions.csv"), read_csv(evaluated / "most_confident_wrong.csv"), 2
    )
    items = gradcam_overlays(tiny_run.checkpoint, samples, predictor)
    assert len(items) == len(samples) > 0 and all(item["overlay"] for item in items)
    assert [p.requires_grad for p in predictor.model.parameters()] == flags


def test_compare_writes_the_leaderboard_as_html(tiny_run: TinyRun, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for name, accuracy in (("a", 0.5), ("b", 0.75)):
        run = root / name
        shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("eval-*", "export"))
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["test/acc"] = accuracy
        (run / "metrics.json").write_text(json.dumps(metrics))
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text((tiny_run.run_dir / "config.yaml").read_text())
    rows = compare(compose_tool("compare", f"runs={root}", "throughput=false"))
    page = Page((root / "leaderboard.html").read_text())
    assert_self_contained(page)
    table = [a.get("data-status") for _, a in page.find("tr") if "data-status" in a]
    assert (
        table == [r["status"] for r in rows] == ["ok", "ok", "incomplete"]
    )  # no failed.json: nothing says it failed
    runs = [page.inner(i) for i, a in page.find("td", data_key="run")]
    accuracies = [page.inner(i) for i, a in page.find("td", data_key="test_acc")]
    assert runs == ["b", "a", "broken"] and accuracies == ["0.7500", "0.5000", "-"]
    assert "Recommended:" in "".join(page.text) and page.find("strong")
