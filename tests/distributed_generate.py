"""One rank of a tensor-parallel ``generate`` with SparseSemanticCache, run by ``tests/test_distributed.py``:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_generate.py MODEL OUT DICT...

Loads the model from the folder MODEL with ``tp_plan="auto"`` (gloo on the CPU) and the "sta" attention, and for
each dictionary folder DICT generates greedily from a fixed prompt; rank r writes OUT/rank{r}.json with the tokens,
the KV heads each layer coded, its own and the group's bytes, and which of the unsharded model's KV heads its
cached keys are (the split the cache assumes, checked against the model's own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sta_cache import SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.memory import storage_bytes

PROMPT = torch.arange(3, 43).unsqueeze(0)  # 40 tokens: past the window, so most of them are coded
CACHE_OPTIONS = {"residual_length": 8, "num_sink_tokens": 2, "encode_batch": 4}
NEW_TOKENS = 12


def per_row_bytes(cache: SparseSemanticCache) -> dict[str, int]:
    """The bytes of the bookkeeping kept per row, not per head (pre-RoPE code positions; sink and window positions
    and real-token flags), which every rank holds whole."""
    layers = cache.sparse_layers
    return {
        "code_bytes": storage_bytes([layer.key_positions for layer in layers]),
        "dense_bytes": storage_bytes([layer.dense_tensors()[4:] for layer in layers]),
    }


def held_heads(model, reference) -> list[int]:
    """The heads of the unsharded ``reference`` model whose layer-0 keys equal this rank's, in order."""
    caches = [DynamicCache(config=model.config), DynamicCache(config=reference.config)]
    with torch.no_grad():
        for m, cache in zip((model, reference), caches, strict=True):
            m(PROMPT, **cache_kwargs(m, cache))
    local, full = caches[0].layers[0].keys, caches[1].layers[0].keys
    return [
        next(h for h in range(full.shape[1]) if torch.allclose(local[:, i], full[:, h], atol=1e-5))
        for i in range(local.shape[1])
    ]


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", attn_implementation="sta").eval()
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rank = torch.distributed.get_rank()
    result = {"tp_size": model.tp_size, "held_heads": held_heads(model, reference), "runs": {}}
    for folder in sys.argv[3:]:
        cache = SparseSemanticCache.from_pretrained(folder, model=model, **CACHE_OPTIONS)
        tokens = model.generate(PROMPT, **cache_kwargs(model, cache), max_new_tokens=NEW_TOKENS, do_sample=False)
        result["runs"][Path(folder).name] = {
            "tokens": tokens[0].tolist(),
            "ranks": [cache.ranks.rank, cache.ranks.size, cache.ranks.group is not None],
            "kv_heads": [None if layer.kv_heads is None else list(layer.kv_heads) for layer in cache.sparse_layers],
            "footprint": cache.memory_footprint(),  # first: it encodes what has left the window
            "group_footprint": cache.memory_footprint(across_ranks=True),
            "per_row_bytes": per_row_bytes(cache),
            "sae_bytes": storage_bytes([layer.sae for layer in cache.sparse_layers]),
        }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
