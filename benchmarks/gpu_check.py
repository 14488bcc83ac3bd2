"""The checks to run on the day a GPU is lent: every Triton kernel against its PyTorch reference on fresh random
CUDA inputs (the tests run them only under the CPU interpreter), a model split over the GPU and the CPU (accelerate's
``dispatch_model``, what ``device_map`` does), ``sta-cache train``'s job on the GPU against the CPU, then the
kernels' timing.

    python benchmarks/gpu_check.py                     # correctness, a few seconds; exits 1 on any mismatch
    python benchmarks/gpu_check.py --bench --out DIR   # then benchmarks/bench_kernels.py's GPU sizes into DIR
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sta_cache import KVDictionary, KVDictionaryConfig, SparseSemanticCache, cache_kwargs
from sta_cache.kernels import reference, triton_attention, triton_encode


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def encoder_checks(device: torch.device) -> list[tuple[str, float, float]]:
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for m, n, d, k in ((4096, 1024, 64, 8), (4096, 1024, 64, 16), (1024, 4096, 128, 16)):
        atoms = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=-1)
        bias, x = 0.1 * torch.randn(d, device=device, generator=g), torch.randn(m, d, device=device, generator=g)
        for pursuit in ("omp", "mp"):
            indices, coefficients = triton_encode.omp_encode(x, atoms, bias, k, pursuit=pursuit)
            want_indices, want_coefficients = reference.omp_encode_reference(x, atoms, bias, k, pursuit=pursuit)
            got = (coefficients.unsqueeze(-1) * atoms[indices]).sum(1)
            want = (want_coefficients.unsqueeze(-1) * atoms[want_indices]).sum(1)
            same_rows = float((indices == want_indices).all(-1).float().mean())
            rows.append((f"{pursuit} encode m={m} N={n} d={d} k={k}", rel_err(got, want), 1 - same_rows))
    return rows


def attention_checks(device: torch.device) -> list[tuple[str, float, float]]:
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for b, hkv, groups, d, c, n in ((1, 8, 4, 128, 32768, 4096), (4, 8, 4, 64, 4096, 1024)):

        def randn(*shape, scale=1.0):
            return torch.randn(*shape, device=device, generator=g) * scale

        kv = reference.CompressedKV(
            sink_keys=randn(b, hkv, 4, d),
            sink_values=randn(b, hkv, 4, d),
            key_indices=torch.randint(0, n, (b, hkv, c, 8), device=device, generator=g, dtype=torch.int16),
            key_coefficients=randn(b, hkv, c, 8, scale=8**-0.5),
            value_indices=torch.randint(0, n, (b, hkv, c, 16), device=device, generator=g, dtype=torch.int16),
            value_coefficients=randn(b, hkv, c, 16, scale=0.25),
            window_keys=randn(b, hkv, 64, d),
            window_values=randn(b, hkv, 64, d),
            key_atoms=randn(1, n, d, scale=d**-0.5),
            key_bias=randn(1, d, scale=0.1),
            value_atoms=randn(1, n, d, scale=d**-0.5),
            value_bias=randn(1, d, scale=0.1),
        )
        query = randn(b, hkv * groups, 1, d)
        got = triton_attention.sparse_attention(query, kv, None, d**-0.5, None)
        want = reference.sparse_attention_reference(query, kv, None, d**-0.5, None)
        rows.append((f"attention b={b} Hkv={hkv} d={d} C={c} N={n}", rel_err(got, want), 0.0))
    return rows


def device_split_checks(first: torch.device, second: torch.device) -> list[tuple[str, float, float]]:
    """A tiny Llama with layer 0 on ``first`` and layers 1-2 on ``second``, "sta" attention and an exact
    dictionary (the signed basis, k = head_dim): greedy tokens must equal DynamicCache's on the same split, and every
    layer's codes, window and dictionary copy must sit on its own layer's device. Errors: the share of differing
    tokens, the share of layers with a tensor elsewhere."""
    from accelerate import dispatch_model

    torch.manual_seed(0)
    config = LlamaConfig(  # the tests' tiny Llama
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("sta")
    layer_devices = [first, second, second]
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": second, "lm_head": second}
    device_map |= {f"model.layers.{i}": device for i, device in enumerate(layer_devices)}
    model = dispatch_model(model, device_map=device_map)
    d = 16
    meta = KVDictionaryConfig(
        base_model="tiny-llama",
        num_layers=3,
        layer_indices=[0, 1, 2],
        num_kv_heads=2,
        head_dim=d,
        n_atoms=2 * d,
        per_head=True,
        k_key=d,
        k_value=d,
        encoder="omp",
    )
    dictionary = KVDictionary(meta)
    with torch.no_grad():
        for i in meta.layer_indices:
            for sae in (*dictionary[i].key, *dictionary[i].value):
                sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
    prompt = torch.arange(3, 43, device=first).unsqueeze(0)
    tokens = {}
    for name, cache in (
        ("dynamic", DynamicCache(config=config)),
        ("sta", SparseSemanticCache(dictionary, model=model, residual_length=8, num_sink_tokens=2, encode_batch=4)),
    ):
        tokens[name] = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False)
    differing = float((tokens["sta"] != tokens["dynamic"]).float().mean())
    misplaced = 0
    for layer, device in zip(cache.sparse_layers, layer_devices, strict=True):
        held = [*layer.sae["key"].values(), *layer.sae["value"].values(), *layer.code_tensors(), layer.keys]
        misplaced += any(t is not None and t.device.type != device.type for t in held)
    label = f"device_map layers {[d.type for d in layer_devices]}: tokens vs DynamicCache, misplaced layers"
    return [(label, differing, misplaced / len(layer_devices))]


def training_checks(device: torch.device) -> list[tuple[str, float, float, float]]:
    """SmolLM2's dictionaries learned on ``device`` and on the CPU by the same small job (``train_dictionary``:
    collection, OMP codes and MOD statistics on the model's device): the held-out reconstruction error (FVU) of
    each kind must agree within 5% (float32 on both; picks on near-ties may differ, so not bit for bit)."""
    import tempfile

    from sta_cache.configs import TrainConfig
    from sta_cache.embedded import load_model, wikipedia_text
    from sta_cache.training import train_dictionary

    config = TrainConfig(
        n_atoms=256, max_tokens=2048, eval_tokens=512, vectors=4000, iterations=2, check_perplexity=False
    )
    fvu = {}
    for where in (device, torch.device("cpu")):
        model, tokenizer = load_model("smollm2")
        with tempfile.TemporaryDirectory() as out:
            trained = train_dictionary(model.to(where), tokenizer, wikipedia_text("train"), config, out, progress=False)
        fvu[where.type] = trained.config.evaluation
    rows = []
    for kind in ("key", "value"):
        got, want = fvu[device.type][f"{kind}_fvu_omp"], fvu["cpu"][f"{kind}_fvu_omp"]
        rows.append(
            (f"train on {device.type}: held-out {kind} FVU {got:.4f} vs CPU {want:.4f}", abs(got / want - 1), 0.0, 0.05)
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="also run bench_kernels.py at its GPU sizes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu"), help="where --bench writes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (the tests cover the kernels under the CPU interpreter)")
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    failed = False
    checks = encoder_checks(device) + attention_checks(device) + device_split_checks(device, torch.device("cpu"))
    checks += training_checks(device)
    for name, error, differing_rows, *tolerance in checks:
        # float32 throughout; greedy picks may differ on near-ties
        ok = error < (tolerance[0] if tolerance else 1e-3) and differing_rows < 0.02
        failed |= not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {name}: relative error {error:.2e}, rows with other picks {differing_rows:.1%}"
        )
    if args.bench and not failed:
        command = [sys.executable, "benchmarks/bench_kernels.py", "--contexts", "1024", "32768", "131072"]
        subprocess.run([*command, "--batch", "1", "4", "16", "--out", str(args.out)], check=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
