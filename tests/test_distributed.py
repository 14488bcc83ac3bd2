"""Beyond one device: tensor-parallel generate under torchrun (2 ranks, gloo on the CPU), which KV heads a rank
holds, the group's bytes, and layers whose key states live on different devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_dictionary, tiny_model
from sta_cache import SparseSemanticCache
from sta_cache.cache import UnsupportedModelError
from sta_cache.compat import cache_kwargs
from sta_cache.distributed import Ranks, all_reduce_sum, kv_heads_of_rank, tensor_parallel, world
from sta_cache.layer import SparseSemanticLayer
from sta_cache.memory import storage_bytes

sys.path.insert(0, str(Path(__file__).parent))
from distributed_generate import CACHE_OPTIONS, NEW_TOKENS, PROMPT, per_row_bytes  # noqa: E402

SCRIPT = Path(__file__).with_name("distributed_generate.py")
RANKS = 2
LAYER_OPTIONS = dict(
    k_key=4, k_value=6, key_space="post_rope", encoder="topk", rope_scaling=1.0, residual_length=4, num_sink_tokens=0
)
DICTIONARIES = {"per_head": {"per_head": True}, "shared": {"per_head": False}}


@pytest.mark.parametrize(
    ("heads", "local", "size", "expected"),
    [
        (8, 8, 1, [range(8)]),
        (8, 2, 4, [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]),
        (2, 1, 4, [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]),  # fewer heads than ranks: replicated
        (8, 8, 2, [range(8), range(8)]),  # heads left whole (a model without a TP plan for k_proj)
        (8, 3, 2, [None, None]),
        (8, 2, 2, [None, None]),
    ],
)
def test_kv_heads_of_rank_follows_the_contiguous_split(heads, local, size, expected):
    assert [kv_heads_of_rank(heads, local, Ranks(rank, size)) for rank in range(size)] == expected


def test_one_process_is_rank_0_of_1():
    assert world() == Ranks(0, 1) and tensor_parallel(tiny_model("llama")) == Ranks(0, 1)
    assert all_reduce_sum([3.0, 4.5], Ranks()) == [3.0, 4.5]


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """The torchrun run's per-rank results, the single-process runs with the same dictionaries, and its time."""
    root = tmp_path_factory.mktemp("tp")
    model = tiny_model("llama", "sta")
    model.save_pretrained(root / "model")
    folders, single = [], {}
    for name, options in DICTIONARIES.items():
        dictionary = make_dictionary(model, key_space="pre_rope", encoder="omp", **options)
        folders.append(str(dictionary.save_pretrained(root / name)))
        cache = SparseSemanticCache(dictionary, model=model, **CACHE_OPTIONS)
        tokens = model.generate(PROMPT, **cache_kwargs(model, cache), max_new_tokens=NEW_TOKENS, do_sample=False)
        single[name] = {
            "tokens": tokens[0].tolist(),
            "sae_bytes": storage_bytes([layer.sae for layer in cache.sparse_layers]),
            "footprint": cache.memory_footprint(),
            "per_row_bytes": per_row_bytes(cache),
        }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}"]
    start = time.perf_counter()
    result = subprocess.run(
        [*command, str(SCRIPT), str(root / "model"), str(root), *folders],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(RANKS)]
    return ranks, single, seconds


def test_each_rank_caches_its_contiguous_share_of_the_kv_heads(tensor_parallel_run):
    """transformers' colwise k_proj gives rank r head r of 2: the split kv_heads_of_rank assumes, and the per-head
    SAEs each rank's layers picked."""
    ranks, _, _ = tensor_parallel_run
    for r, result in enumerate(ranks):
        assert result["tp_size"] == RANKS
        assert result["held_heads"] == [r]
        assert all(run["ranks"] == [r, RANKS, True] for run in result["runs"].values())  # the model's TP group
        assert all(heads == [r] for heads in result["runs"]["per_head"]["kv_heads"])
        assert all(heads is None for heads in result["runs"]["shared"]["kv_heads"])


@pytest.mark.parametrize("dictionary", list(DICTIONARIES))
def test_tensor_parallel_generate_matches_one_process(tensor_parallel_run, dictionary):
    """Greedy tokens of every rank equal one process's with the same dictionary, on the "sta" path."""
    ranks, single, _ = tensor_parallel_run
    for result in ranks:
        assert result["runs"][dictionary]["tokens"] == single[dictionary]["tokens"]
    assert len(single[dictionary]["tokens"]) == PROMPT.shape[1] + NEW_TOKENS


@pytest.mark.parametrize("dictionary", list(DICTIONARIES))
def test_ranks_report_their_own_bytes_and_the_group_sums_them(tensor_parallel_run, dictionary):
    """Each rank holds half of one process's per-head codes and dense tokens, and the whole per-row bookkeeping
    (positions, real-token flags); the group's footprint is the ranks' sum. A rank's copy of a per-head dictionary
    holds its heads' SAEs only; a shared one is whole on each."""
    ranks, single, _ = tensor_parallel_run
    alone = single[dictionary]["footprint"]
    runs = [result["runs"][dictionary] for result in ranks]
    for run in runs:
        assert 2 * run["footprint"]["dynamic_cache_bytes"] == alone["dynamic_cache_bytes"]
        for name in ("code_bytes", "dense_bytes"):
            per_row = run["per_row_bytes"][name]
            assert per_row == single[dictionary]["per_row_bytes"][name] > 0
            assert 2 * (run["footprint"][name] - per_row) == alone[name] - per_row > 0
    for name in ("code_bytes", "dense_bytes", "dictionary_bytes", "dynamic_cache_bytes"):
        assert all(run["group_footprint"][name] == sum(r["footprint"][name] for r in runs) for run in runs)
    share = 2 if dictionary == "per_head" else 1
    assert all(share * run["sae_bytes"] == single[dictionary]["sae_bytes"] for run in runs)


def test_tensor_parallel_run_is_quick(tensor_parallel_run):
    """Two ranks, two dictionaries, model loading included: well within the suite's budget."""
    assert tensor_parallel_run[2] < 120


def test_heads_that_fit_no_split_are_refused():
    """One process whose layer gets 1 of the dictionary's 2 heads: no tensor-parallel group says which it is."""
    model = tiny_model("llama")
    dictionary = make_dictionary(model, per_head=True)
    cache = SparseSemanticCache(dictionary, config=model.config)
    one_head = torch.randn(1, 1, 3, 16)
    with pytest.raises(UnsupportedModelError, match="layer 0 of the model has 1 KV heads .* made for 2 KV heads"):
        cache.update(one_head, one_head, 0)
    layer = SparseSemanticLayer(dictionary[0], layer_idx=0, ranks=Ranks(0, 3), **LAYER_OPTIONS)
    with pytest.raises(ValueError, match="per-head SAEs for 2, and no split of those over 3 tensor-parallel rank"):
        layer.update(one_head, one_head)


def test_a_rank_codes_its_heads_with_their_own_saes():
    """Rank 1 of 2 holding head 1: its codes are the single-process codes of head 1."""
    model = tiny_model("llama")
    dictionary = make_dictionary(model, per_head=True, encoder="omp")
    states = torch.randn(1, 2, 12, 16)
    caches = {}
    for ranks in (Ranks(), Ranks(1, 2)):
        cache = SparseSemanticCache(dictionary, config=model.config, residual_length=2, num_sink_tokens=0)
        cache.ranks = ranks
        for layer in cache.sparse_layers:
            layer.ranks = ranks
        local = states if ranks.size == 1 else states[:, 1:]
        cache.update(local, local, 0)
        cache.flush()
        caches[ranks.size] = cache.layers[0]
    whole, rank = caches[1], caches[2]
    assert rank.kv_heads == range(1, 2)
    assert rank.sae["key"]["W_dec"].shape[0] == 1
    assert torch.equal(rank.sae["key"]["W_dec"][0], whole.sae["key"]["W_dec"][1])
    assert rank.num_compressed == 10
    for kind in ("key", "value"):
        for i in range(2):
            assert torch.equal(rank.codes[kind][i][:, 0], whole.codes[kind][i][:, 1])


def test_each_layer_keeps_codes_and_dictionary_on_its_key_states_device():
    """A model split over devices (device_map) hands each layer key states on that layer's device: the layer's
    dictionary copy, codes and window follow them. Here layer 0 is on the CPU and layer 1 on "meta" (shapes
    only), the one split this machine can run."""
    model = tiny_model("llama")
    cache = SparseSemanticCache(make_dictionary(model, per_head=True), config=model.config, backend="torch")
    cpu, meta = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16, device="meta")
    cache.update(cpu, cpu, 0)
    cache.update(meta, meta, 1)
    for layer, device in zip(cache.sparse_layers[:2], ("cpu", "meta"), strict=True):
        tensors = [*layer.sae["key"].values(), *layer.sae["value"].values(), layer.rope_inv_freq]
        tensors += [t for t in (*layer.dense_tensors(), *layer.code_tensors()) if t is not None]
        assert {t.device.type for t in tensors} == {device}
        assert layer.get_seq_length() == 5
