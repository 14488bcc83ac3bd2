"""Atoms for keys, the rotated scalar quantizer for values: does each kind's best coder beat atoms for both at
equal bits? (issue 18: "keys are sparse routers, values dense payloads; measure it").

Each row is a cache whose keys are OMP codes over the dictionary's pre-RoPE key atoms (``--k-keys`` atoms, fp8
coefficients, packed indices, int32 positions: what SparseSemanticCache stores) and whose values are stored by the
rotated Lloyd-Max quantizer of ``sta_cache.baselines`` (``--value-bits`` per coordinate + a float16 norm), with the
same dense sinks and window as every other cache of the eval. The rows run through ``sta-cache eval``'s own
measurement (perplexity over the same held-out texts, bits per element from the stored tensors), beside
DynamicCache. Compare them with the eval's STA budgets at the same bits (README "Quality").

    python benchmarks/hybrid_values.py --k-keys 8,10 --value-bits 2,2.5,3 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import DynamicCache

from sta_cache import KVDictionary
from sta_cache.baselines.rotated import KINDS, RotatedQuantizedLayer, RotatedQuantizer, haar_rotation
from sta_cache.baselines.window import WindowedQuantizedCache
from sta_cache.configs import EvalConfig
from sta_cache.embedded import eval_texts, load_model
from sta_cache.evaluation.run import _add_ratios, _evaluate_spec
from sta_cache.evaluation.specs import CacheSpec
from sta_cache.kernels import dispatch
from sta_cache.kernels.reference import apply_rope, decode_reference, undo_rope
from sta_cache.packing import pack_indices, unpack_indices


class AtomKeysRotatedValuesLayer(RotatedQuantizedLayer):
    """Keys: OMP codes over the layer's pre-RoPE key atoms; values: the rotated quantizer. Slot i is position i
    (the baselines' layout: no left padding), so a block's positions follow from where it starts."""

    def __init__(self, layer_dictionary, k_key: int, quantizers: dict[str, RotatedQuantizer], **window):
        super().__init__(quantizers, **window)
        atoms = layer_dictionary.on_device("key", torch.device("cpu"), ("W_dec", "b_dec"))
        self.atoms, self.bias = atoms["W_dec"], atoms["b_dec"]  # [1, N, d], [1, d]: one dictionary for all heads
        self.inv_freq, self.k_key = layer_dictionary.rope_inv_freq, k_key

    def quantize(self, kind: str, states: torch.Tensor) -> dict[str, torch.Tensor]:
        if kind == "value":
            return super().quantize(kind, states)
        batch, heads, n, d = states.shape
        start = self.num_sinks + self.num_compressed
        positions = torch.arange(start, start + n).expand(batch, n)
        pre = undo_rope(states, positions, self.inv_freq).reshape(-1, d)
        sae = {"W_dec": self.atoms[0], "b_dec": self.bias[0]}
        indices, coefficients = dispatch.encode(pre, sae, self.k_key, "omp", "cpu", pursuit="omp")
        n_atoms = self.atoms.shape[1]
        return {
            "indices": pack_indices(indices.view(batch, heads, n, -1), n_atoms),
            "coefficients": coefficients.view(batch, heads, n, -1).to(torch.float8_e4m3fn),
            "positions": positions.to(torch.int32).unsqueeze(1).contiguous(),  # [B, 1, n]: as STA stores them
        }

    def dequantize(self, kind: str, stored: dict[str, torch.Tensor]) -> torch.Tensor:
        if kind == "value":
            return super().dequantize(kind, stored)
        indices = unpack_indices(stored["indices"], self.k_key, self.atoms.shape[1])
        keys = decode_reference(indices, stored["coefficients"].float(), self.atoms, self.bias)
        return apply_rope(keys, stored["positions"][:, 0].long(), self.inv_freq)


def hybrid_cache(model, dictionary: KVDictionary, k_key: int, value_bits: float, seed: int, window: dict):
    head_dim = dictionary.config.head_dim
    generator = torch.Generator().manual_seed(seed)

    def make_layer(layer_idx: int) -> AtomKeysRotatedValuesLayer:
        quantizers = {kind: RotatedQuantizer(haar_rotation(head_dim, generator), value_bits) for kind in KINDS}
        return AtomKeysRotatedValuesLayer(dictionary[layer_idx], k_key, quantizers, flush_tokens=16, **window)

    return WindowedQuantizedCache(make_layer, model.config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dictionary", default="sta-cache/SmolLM2-135M-Instruct")
    parser.add_argument("--k-keys", default="8,10", help="key atoms per vector, one row each with every value rate")
    parser.add_argument("--value-bits", default="2,2.5,3", help="rotated quantizer bits per value coordinate")
    parser.add_argument("--seed", type=int, default=0, help="rotation seed")
    parser.add_argument("--n-texts", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hybrid_values"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    dictionary = KVDictionary.from_pretrained(args.dictionary)
    if dictionary.config.key_space != "pre_rope" or dictionary.config.encoder != "omp":
        raise SystemExit("this experiment codes keys by OMP before RoPE: give a pre-RoPE OMP dictionary")
    config = EvalConfig(
        context=args.context, n_texts=args.n_texts, prefill=512, chunk=64, passkey_trials=0, progress=False
    )
    window = dict(residual_length=config.residual_length, num_sink_tokens=config.num_sink_tokens)
    texts = eval_texts(tokenizer, config.n_texts, config.context)
    specs = [CacheSpec("DynamicCache", "dynamic", "sdpa", lambda: DynamicCache(config=model.config), {})]
    for k_key in [int(k) for k in args.k_keys.split(",")]:
        for bits in [float(b) for b in args.value_bits.split(",")]:
            specs.append(
                CacheSpec(
                    f"keys {k_key} atoms, values rotated {bits:g}-bit",
                    "hybrid",
                    "sdpa",
                    lambda k_key=k_key, bits=bits: hybrid_cache(model, dictionary, k_key, bits, args.seed, window),
                    {"k_key": k_key, "value_bits": bits, "seed": args.seed},
                )
            )
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        row = {"name": spec.name, "family": spec.family, "params": spec.params}
        row.update(_evaluate_spec(model, tokenizer, spec, texts, [], config))
        rows.append(row)
        _add_ratios(rows)
        (args.out / "results.json").write_text(json.dumps({"rows": rows}, indent=1, default=str))
        ratio = row.get("ppl_ratio", 1.0)
        per_text = " ".join(f"{r:.4f}" for r in row.get("ppl_ratio_per_text", []))
        print(f"{spec.name:40s} {row['bytes']['bits_per_element']:5.2f} bits  x{ratio:.4f}  ({per_text})", flush=True)


if __name__ == "__main__":
    main()
