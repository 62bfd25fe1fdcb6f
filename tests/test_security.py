"""Untrusted files never run code: a TorchScript program is not loaded unless trusted, a run's stored config
is read as data, the exported app serves only its example photos, and the demo shows no server paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from foodvision.app.demo import example_photos, serve
from foodvision.cli import run_tool
from foodvision.cli.export import export
from foodvision.evaluation.evaluate import evaluate
from foodvision.inference.checkpoints import META_KEY, export_metadata, load_checkpoint_model, quiet_jit
from foodvision.inference.predict import predict
from foodvision.inference.predictor import Predictor

from .conftest import TinyRun, compose_tool
from .demo_helpers import free_port, python, stop, wait_for_url


# ---- 6. TorchScript is a program ---------------------------------------------------------------------------
class Payload(torch.nn.Module):
    """A TorchScript model whose ``__setstate__`` (run by ``torch.jit.load``) creates and fills a file."""

    def __init__(self, marker: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(6))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.marker = state[1]
        self.training = state[2]
        # used, so the compiler keeps it: writes 16 float32 of 65.0 into a new file named by the payload
        self.w = state[0] + 0.0 * torch.from_file(self.marker, True, 16).fill_(65)[:6]


def malicious_torchscript(path: Path, marker: Path, tiny_run: TinyRun) -> Path:
    """``path``: the payload, with genuine foodvision metadata (copied from a real checkpoint)."""
    _, info, _ = load_checkpoint_model(tiny_run.checkpoint)
    with quiet_jit():
        scripted = torch.jit.script(Payload(str(marker)))
        torch.jit.save(
            scripted, str(path), _extra_files={META_KEY: export_metadata(info, format="torchscript")}
        )
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_the_payload_really_runs_code_when_trusted(tiny_run: TinyRun, tmp_path: Path) -> None:
    """The test's payload is real: loading it with trust_torchscript=true writes the marker."""
    marker = tmp_path / "marker"
    evil = malicious_torchscript(tmp_path / "model.pt", marker, tiny_run)
    Predictor(evil, device="cpu", trust_torchscript=True)
    assert marker.is_file() and marker.read_bytes()[:4] == torch.tensor([65.0]).numpy().tobytes()


@pytest.mark.parametrize("name", ["model.pt", "model.ckpt", "model.bin"])
@pytest.mark.parametrize("tool", ["predict", "eval", "serve"])
def test_torchscript_is_not_loaded_unless_trusted(
    tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], tool: str, name: str
) -> None:
    marker = tmp_path / "marker"
    evil = malicious_torchscript(tmp_path / name, marker, tiny_run)
    photo = next((tiny_run.data_root / "test" / "donuts").glob("*.jpg"))
    function, overrides = {
        "predict": (predict, [f"inputs=[{photo}]"]),
        "eval": (evaluate, [f"output_dir={tmp_path / 'eval'}", "report=false"]),
        "serve": (serve, [f"port={free_port()}", "block=false"]),
    }[tool]
    with pytest.raises(SystemExit):
        run_tool(function, compose_tool(tool, f"ckpt_path={evil}", *overrides))
    line = one_error_line(capsys)
    assert not marker.exists()
    if name == "model.ckpt":  # read as a checkpoint: torch.load(weights_only=True) refuses the archive
        assert "TorchScript program, not a checkpoint" in line and "weights_only=False" not in line
    else:
        assert "TorchScript is a program, not weights" in line and "trust_torchscript=true" in line


def test_trusted_torchscript_export_still_predicts(tiny_run: TinyRun, tmp_path: Path) -> None:
    """export.py format=torchscript checks its own file; predict.py runs it once told to trust it."""
    output = tmp_path / "model.pt"
    export(
        compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=torchscript", f"output={output}")
    )
    photo = next((tiny_run.data_root / "test" / "donuts").glob("*.jpg"))
    code, rows, _ = predict(
        compose_tool("predict", f"ckpt_path={output}", f"inputs=[{photo}]", "trust_torchscript=true")
    )
    assert code == 0 and len(rows) == 1
    with pytest.raises(Exception, match="trust_torchscript must be true or false"):
        Predictor(output, trust_torchscript="yes")


# ---- 7. a downloaded run's config.yaml is data --------------------------------------------------------------
def instantiating(marker: Path) -> dict:
    """What hydra.utils.instantiate turns into ``Path(marker).write_text("pwned")``."""
    return {
        "_target_": "pathlib.Path.write_text",
        "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
        "data": "pwned",
    }


def downloaded_run(tiny_run: TinyRun, folder: Path, key: str, marker: Path) -> Path:
    """A copy of the tiny run (its checkpoint and config.yaml) whose ``data.<key>`` holds a ``_target_``."""
    (folder / "checkpoints").mkdir(parents=True)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    shutil.copyfile(tiny_run.checkpoint, checkpoint)
    config = OmegaConf.load(tiny_run.run_dir / "config.yaml")
    payload = instantiating(marker)
    config.data[key] = [payload] if key == "classes" else payload
    OmegaConf.save(config, folder / "config.yaml")
    return checkpoint


@pytest.mark.parametrize("key", ["max_per_class", "classes"])
def test_eval_never_instantiates_a_stored_config(
    tiny_run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    marker = tmp_path / "pwned.txt"
    checkpoint = downloaded_run(tiny_run, tmp_path / "run", key, marker)
    cfg = compose_tool("eval", f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'eval'}", "report=false")
    with pytest.raises(SystemExit):
        run_tool(evaluate, cfg)
    line = one_error_line(capsys)
    assert not marker.exists()
    assert str(tmp_path / "run" / "config.yaml") in line
    assert f"data.{key}" in line and "_target_" in line and "pathlib.Path.write_text" in line
    # serve.py and export.py format=app read the same section for their example photos: none, no file
    serve_cfg = compose_tool("serve", f"ckpt_path={checkpoint}")
    assert example_photos(serve_cfg, tmp_path / "run", list(tiny_run.classes), 6) == []
    assert not marker.exists()


# ---- 8. the exported app serves only its examples; 9. "One photo" explains a non-image ---------------------
def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_exported_app_serves_no_file_of_its_folder_but_the_examples(
    tiny_run: TinyRun, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    gradio_client = pytest.importorskip("gradio_client")
    app_dir = tmp_path / "app"
    export(compose_tool("export", f"ckpt_path={tiny_run.checkpoint}", "format=app", f"output={app_dir}"))
    (app_dir / ".env").write_text("SECRET_TOKEN=hunter2\n")
    (app_dir / ".git").mkdir()
    (app_dir / ".git" / "config").write_text("[remote]\n token = hunter2\n")
    example = json.loads((app_dir / "app.json").read_text())["examples"][0]
    port = free_port()
    process = subprocess.Popen(
        [python(), "app.py", "--port", str(port)],
        cwd=app_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, _ = wait_for_url(process)
        assert url.startswith(f"http://127.0.0.1:{port}")
        base = url.rstrip("/")
        for secret in (".env", ".git/config", "app.json", "model.onnx"):
            status, body = get(f"{base}/gradio_api/file={app_dir.resolve() / secret}")
            assert status >= 400 and b"hunter2" not in body, (secret, status)
        status, body = get(f"{base}/gradio_api/file={app_dir.resolve() / example}")
        assert status == 200 and body == (app_dir / example).read_bytes()

        fake = tmp_path / "fake.jpg"
        fake.write_text("not a photo")
        label, status_text = gradio_client.Client(url, verbose=False).predict(
            gradio_client.handle_file(str(fake)), api_name="/classify"
        )
        assert not label and "fake.jpg is not an image" in status_text
    finally:
        stop(process)
