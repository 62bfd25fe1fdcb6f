"""A callback the DDP test injects through the config: records, per rank and step, digests of the weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from foodvision.training.callbacks.feature_cache import in_prefix, state_digest


class RankConsistencyProbe(Callback):
    """Writes ``step all-weights-digest frozen-digest stage`` lines to ``out_dir/rank<N>.txt``.

    The frozen digest covers the whole backbone in stage 1 and the stem plus the first ``prefix_depth``
    blocks in stage 2, so the test can check that what should not move did not move on any rank.
    """

    def __init__(self, out_dir: str, prefix_depth: int = 5):
        self.out_dir = Path(out_dir)
        self.prefix_depth = prefix_depth

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args, **kwargs) -> None:
        backbone = pl_module.net.backbone
        stage = 2 if any(p.requires_grad for p in backbone.parameters()) else 1
        frozen = (
            state_digest(backbone) if stage == 1 else state_digest(backbone, in_prefix(self.prefix_depth))
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"rank{trainer.global_rank}.txt").open("a") as handle:
            handle.write(f"{trainer.global_step} {state_digest(pl_module.net)} {frozen} {stage}\n")
