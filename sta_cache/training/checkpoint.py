"""The files of a training run's output folder, and resuming from them.

``checkpoint.pt`` holds the whole state of an unfinished run (weights, Adam, reservoirs, RNG, stream position) and
how much of ``train_log.jsonl`` it had written; ``train_state.json`` marks a finished run. Both carry a
fingerprint of everything that determines the weights (training config, model geometry, text), so a checkpoint is
resumed, and a finished run reused, only by the run it belongs to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..configs import TrainConfig
from ..text import TextSource

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
STATE_NAME = "train_state.json"
EVALUATION_NAME = "evaluation.json"

__all__ = [
    "CHECKPOINT_NAME",
    "EVALUATION_NAME",
    "LOG_NAME",
    "STATE_NAME",
    "RunFolder",
    "TrainLog",
    "fingerprint",
    "save_checkpoint",
]


def fingerprint(
    config: TrainConfig,
    geometry: tuple[int, int, int],
    layers: list[int],
    text: TextSource,
    eval_text: TextSource | None,
) -> dict:
    """What determines a run's weights: the weight-affecting config fields, the model's ``(num_layers, heads,
    head_dim)`` and the layers trained, and the training text (file path and content, or dataset) and held-out
    text."""
    num_layers, heads, d = geometry
    return {
        "train_config": config.weights_fingerprint(),
        "model": {"num_layers": num_layers, "heads": heads, "head_dim": d, "layers": layers},
        "text": text.fingerprint(),
        "eval_text": None if eval_text is None else eval_text.fingerprint(),
    }


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


class RunFolder:
    """The output folder of one training run, identified by its :func:`fingerprint`."""

    def __init__(self, root: Path, fingerprint: dict):
        self.root = root
        self.fingerprint = fingerprint
        self.state = root / STATE_NAME
        self.checkpoint = root / CHECKPOINT_NAME
        self.log = root / LOG_NAME
        self.evaluation = root / EVALUATION_NAME

    def _key(self) -> str:
        return json.dumps(self.fingerprint, sort_keys=True)

    def finished(self) -> bool:
        """Whether this very run has finished here (then the dictionary in the folder is its result)."""
        if not self.state.is_file():
            return False
        state = json.loads(self.state.read_text())
        return bool(state.get("finished")) and state.get("fingerprint") == json.loads(json.dumps(self.fingerprint))

    def load_checkpoint(self) -> dict:
        """The checkpoint's payload (``run`` state and ``log_bytes``); ``ValueError`` if another run wrote it."""
        payload = torch.load(self.checkpoint, weights_only=True)
        if payload["fingerprint"] != self._key():
            raise ValueError(
                f"{self.checkpoint} belongs to a different run (model, text or training config differ); pass "
                "resume=False to start over or use another out_dir"
            )
        return payload

    def save_checkpoint(self, run_state: dict, log_bytes: int) -> None:
        save_checkpoint(self.checkpoint, {"fingerprint": self._key(), "run": run_state, "log_bytes": log_bytes})

    def start(self, resuming: bool, log_bytes: int) -> None:
        """Cut the log back to what the checkpoint saw (all of it when starting over); a run that does not resume
        a checkpoint leaves no finished marker or evaluation of an earlier run behind."""
        if self.log.exists():
            with open(self.log, "r+b") as handle:
                handle.truncate(log_bytes)
        if not resuming:
            self.state.unlink(missing_ok=True)
            self.evaluation.unlink(missing_ok=True)

    def finish(self, evaluation: dict) -> None:
        """Write ``evaluation.json`` and the finished marker; drop the checkpoint."""
        self.evaluation.write_text(json.dumps(evaluation, indent=1))
        self.state.write_text(json.dumps({"finished": True, "fingerprint": self.fingerprint}, indent=1))
        self.checkpoint.unlink(missing_ok=True)


class TrainLog:
    """``train_log.jsonl``, one JSON record per line, appended and flushed record by record."""

    def __init__(self, path: Path):
        self.handle = open(path, "a")

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def tell(self) -> int:
        return self.handle.tell()

    def close(self) -> None:
        self.handle.close()
