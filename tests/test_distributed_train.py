"""`sta-cache train` over several processes (torch.distributed, gloo on this CPU, launched with torchrun): the
MOD dictionary equals one process's, split by data or by layers; the Top-K SAEs train data-parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from char_text import write_words
from safetensors.torch import load_file

from conftest import tiny_model
from sta_cache import distributed
from sta_cache.training import TrainConfig
from sta_cache.training.loop import train_sae
from sta_cache.training.reduction import Reduction

ACROSS = Reduction(across_processes=True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed_train.py"


def run_job(out: Path, text: Path, *args: str, processes: int = 1) -> dict:
    """Run tests/distributed_train.py as one plain process or under torchrun; the saved config."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(SCRIPT), str(out), str(text), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "config.json").read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "dictionary.safetensors")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_words(tmp_path_factory.mktemp("text") / "text.txt")


@pytest.fixture(scope="module")
def one_process(text, tmp_path_factory) -> Path:
    """One MOD iteration in one process: the reference for the distributed runs."""
    out = tmp_path_factory.mktemp("single") / "dictionary"
    run_job(out, text, "--iterations", "1")
    return out


def test_data_parallel_mod_equals_one_process(one_process, text, tmp_path):
    """Two processes, each collecting half of the text and summing the least-squares statistics: the same atoms
    up to float summation order (one iteration: later ones may flip a near-tie in the pursuit), and the config
    says who collected what."""
    config = run_job(tmp_path / "data", text, "--iterations", "1", processes=2)
    reference, ours = weights(one_process), weights(tmp_path / "data")
    assert reference.keys() == ours.keys()
    for name in reference:
        assert torch.allclose(reference[name], ours[name], atol=1e-4), name
    single = json.loads((one_process / "config.json").read_text())["training"]
    training = config["training"]
    assert training["world_size"] == 2 and training["shard"] == "data" and single["world_size"] == 1
    assert sum(training["tokens_per_process"]) == single["tokens"] == training["tokens"]
    assert min(training["tokens_per_process"]) > 0


def test_layer_sharded_mod_equals_one_process_and_sae_trains_every_layer(one_process, text, tmp_path):
    """Split by layers, each process learns whole dictionaries with their own random streams: the very atoms of
    one process. The Top-K SAE recipe splits the same way and ends with every layer trained."""
    config = run_job(tmp_path / "layers", text, "--iterations", "1", "--shard", "layers", processes=2)
    reference, ours = weights(one_process), weights(tmp_path / "layers")
    assert reference.keys() == ours.keys()
    for name in reference:
        assert torch.allclose(reference[name], ours[name], atol=1e-6), name
    assert config["training"]["world_size"] == 2 and config["training"]["shard"] == "layers"
    assert (tmp_path / "layers" / "shards" / "rank1" / "dictionary.safetensors").is_file()

    config = run_job(tmp_path / "sae", text, "--method", "sae", "--shard", "layers", processes=2)
    sae = weights(tmp_path / "sae")
    assert config["encoder"] == "topk" and config["layer_indices"] == [0, 1]
    assert all(torch.isfinite(tensor).all() for tensor in sae.values())
    assert {"layers.0.key.0.W_enc", "layers.1.value.0.W_enc"} <= set(sae)
    per_layer = config["evaluation"]["per_layer"]
    assert set(per_layer) == {"0", "1"} and all(row["key"] > 0.5 for row in per_layer.values())


def test_data_parallel_sae_trains_like_one_process(text, tmp_path):
    """The Top-K SAEs split by data: each process streams half of the text, the gradients are averaged (the run
    refuses to save if the processes' weights differ), and the held-out error is that of one process's run on
    the whole text, within the noise of a different batch order."""
    single = run_job(tmp_path / "one", text, "--method", "sae")
    config = run_job(tmp_path / "two", text, "--method", "sae", processes=2)
    training = config["training"]
    assert training["world_size"] == 2 and training["shard"] == "data"
    assert training["tokens_per_process"] == [training["tokens"] // 2] * 2
    assert (tmp_path / "two" / "shards" / "rank1" / "train_log.jsonl").is_file()  # each process logs its own run
    for kind in ("key", "value"):
        ours, reference = config["evaluation"][f"{kind}_fvu_topk"], single["evaluation"][f"{kind}_fvu_topk"]
        assert ours < 1.25 * reference + 0.02, (kind, ours, reference)


def test_sae_data_split_needs_a_window_per_process(monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: distributed.Ranks(0, 2))
    one_window = torch.ones(1, 64, dtype=torch.long)
    with pytest.raises(ValueError, match="cannot be shared by 2 processes"):
        train_sae(tiny_model("llama"), one_window, one_window, [0], TrainConfig(method="sae"), None, reduce=ACROSS)
