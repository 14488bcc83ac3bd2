"""Dictionary learning for matching-pursuit codes (MOD)."""

from __future__ import annotations

import torch

from conftest import VOCAB, tiny_model
from sta_cache import KVDictionary, SparseSemanticCache
from sta_cache.compat import cache_kwargs
from sta_cache.metrics import fraction_of_variance_unexplained as fvu
from sta_cache.training import PursuitConfig, learn_pursuit_dictionary, omp_reconstruct, train_pursuit_dictionary


def test_mod_learns_a_planted_sparse_dictionary():
    """Vectors made of 3 of 24 planted atoms: MOD from data-initialised atoms explains them far better than the
    initial atoms, on held-out vectors."""
    generator = torch.Generator().manual_seed(0)
    planted = torch.nn.functional.normalize(torch.randn(24, 16, generator=generator), dim=-1)

    def sample(n):
        idx = torch.stack([torch.randperm(24, generator=generator)[:3] for _ in range(n)])
        return torch.einsum("nk,nkd->nd", torch.randn(n, 3, generator=generator), planted[idx])

    train, held_out = sample(3000), sample(500)
    start = torch.nn.functional.normalize(train[:24], dim=-1)
    atoms, bias, history = learn_pursuit_dictionary(train, start, torch.zeros(16), k=3, iterations=20)
    before = fvu(held_out, omp_reconstruct(held_out, start, torch.zeros(16), 3))
    after = fvu(held_out, omp_reconstruct(held_out, atoms, bias, 3))
    assert history[-1] < history[0]
    assert after < 0.1 and after < before / 3
    assert torch.allclose(atoms.norm(dim=-1), torch.ones(24), atol=1e-5)


def test_train_pursuit_dictionary_builds_a_working_cache(tmp_path):
    model = tiny_model("gemma3")
    text = tmp_path / "text.txt"
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (4000,), generator=generator).tolist()

    class Tokenizer:  # one id per whitespace-separated number
        bos_token_id = None

        def __call__(self, text, add_special_tokens=True, verbose=True):
            return {"input_ids": [int(t) if t.isdigit() else 1 for t in text.split()]}

    text.write_text("\n".join(" ".join(map(str, tokens[i : i + 50])) for i in range(0, 4000, 50)) + "\n")
    config = PursuitConfig(n_atoms=48, k_key=4, k_value=6, context=32, windows=12, vectors=400, iterations=2)
    dictionary = train_pursuit_dictionary(model, Tokenizer(), text, config, tmp_path / "dict", progress=False)
    assert dictionary.config.layer_indices == [1, 3] and dictionary.config.encoder == "omp"
    loaded = KVDictionary.from_pretrained(tmp_path / "dict")
    assert torch.equal(loaded[3].value[0].W_dec, dictionary[3].value[0].W_dec)
    cache = SparseSemanticCache(loaded, residual_length=2, num_sink_tokens=1, encode_batch=1, config=model.config)
    with torch.no_grad():
        model.set_attn_implementation("sta")
        logits = model(torch.randint(1, VOCAB, (1, 12)), **cache_kwargs(model, cache)).logits
        logits = model(torch.randint(1, VOCAB, (1, 1)), **cache_kwargs(model, cache)).logits
    # 13 tokens: 1 sink, a window of 2, and the rest coded as soon as attention has read them
    assert torch.isfinite(logits).all() and cache.sparse_layers[0].num_compressed == 10
