"""Fewer coefficient bits: do codes with b-bit coefficients on a shared scale move the quality-per-bit frontier
past fp8 coefficients? (issue 18: "fewer coefficient bits, e.g. 4-6-bit coefficients with a shared scale").

Each row is a cache that codes both kinds as SparseSemanticCache does (keys by OMP over the dictionary's pre-RoPE
key atoms, values by matching pursuit over its value atoms, least-squares coefficients, packed 10-bit indices,
int32 key positions), but stores each vector's k coefficients as signed ``b``-bit integers times one float8_e4m3
scale per vector: the largest |coefficient| / (2^(b-1) - 1), rounded up to a float8 so that nothing clips.
The rows run through ``sta-cache eval``'s own measurement (perplexity over the same held-out texts, bits per
element from the stored tensors), beside DynamicCache, with the same dense sinks and window. Compare them with the
eval's fp8 budgets at the same bits (README "Quality").

    python benchmarks/coefficient_bits.py --settings 8/8@4,8/8@5,12/12@4 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import DynamicCache

from sta_cache import KVDictionary
from sta_cache.baselines.window import Stored, WindowedQuantizedCache, WindowedQuantizedLayer
from sta_cache.configs import EvalConfig
from sta_cache.embedded import eval_texts, load_model
from sta_cache.evaluation.run import _add_ratios, _evaluate_spec
from sta_cache.evaluation.specs import CacheSpec
from sta_cache.kernels import dispatch
from sta_cache.kernels.reference import apply_rope, decode_reference, undo_rope
from sta_cache.packing import pack_indices, unpack_indices

SCALE_DTYPE = torch.float8_e4m3fn


def quantize_coefficients(coefficients: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., k]`` float -> (levels in ``[0, 2^bits - 1)`` as int64, float8 scale ``[..., 1]``): level - (2^(b-1) - 1)
    times the scale is the coefficient to the nearest step, the scale rounded up so that none clips."""
    top = (1 << (bits - 1)) - 1
    exact = coefficients.abs().amax(-1, keepdim=True) / top
    scale = exact.to(SCALE_DTYPE)
    short = (
        scale.float() < exact
    )  # round-to-nearest went down: take the next float8 (positive bit patterns are ordered)
    scale = torch.where(short, (scale.view(torch.uint8) + 1).view(SCALE_DTYPE), scale)
    step = scale.float()
    levels = torch.where(step > 0, coefficients / step.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return levels.round().clamp(-top, top).long() + top, scale


def dequantize_coefficients(levels: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return (levels.float() - ((1 << (bits - 1)) - 1)) * scale.float()


class LowBitCodesLayer(WindowedQuantizedLayer):
    """Keys and values as codes over the layer's atoms, with b-bit coefficients on one float8 scale per vector.
    Slot i is position i (the baselines' layout: no left padding), so a block's positions follow from where it
    starts."""

    def __init__(self, layer_dictionary, k: dict[str, int], bits: int, **window):
        super().__init__(**window)
        self.saes = {
            kind: {
                name: t[0]
                for name, t in layer_dictionary.on_device(kind, torch.device("cpu"), ("W_dec", "b_dec")).items()
            }
            for kind in ("key", "value")
        }
        self.n_atoms = self.saes["key"]["W_dec"].shape[0]
        self.inv_freq, self.k, self.bits = layer_dictionary.rope_inv_freq, k, bits

    def quantize(self, kind: str, states: torch.Tensor) -> Stored:
        batch, heads, n, d = states.shape
        stored = {}
        if kind == "key":
            start = self.num_sinks + self.num_compressed
            positions = torch.arange(start, start + n).expand(batch, n)
            states = undo_rope(states, positions, self.inv_freq)
            stored["positions"] = positions.to(torch.int32).unsqueeze(1).contiguous()  # [B, 1, n]: as STA stores them
        pursuit = "omp" if kind == "key" else "mp"
        indices, coefficients = dispatch.encode(
            states.reshape(-1, d), self.saes[kind], self.k[kind], "omp", "cpu", pursuit
        )
        levels, scale = quantize_coefficients(coefficients, self.bits)
        shape = (batch, heads, n, -1)
        stored["indices"] = pack_indices(indices.view(shape), self.n_atoms)
        stored["levels"] = pack_indices(levels.view(shape), 1 << self.bits)
        stored["scale"] = scale.view(shape)
        return stored

    def dequantize(self, kind: str, stored: Stored) -> torch.Tensor:
        k = self.k[kind]
        indices = unpack_indices(stored["indices"], k, self.n_atoms)
        levels = unpack_indices(stored["levels"], k, 1 << self.bits)
        coefficients = dequantize_coefficients(levels, stored["scale"], self.bits)
        sae = self.saes[kind]
        states = decode_reference(indices, coefficients, sae["W_dec"][None], sae["b_dec"][None])
        return apply_rope(states, stored["positions"][:, 0].long(), self.inv_freq) if kind == "key" else states

    def fixed_tensors(self) -> list[torch.Tensor]:
        return []  # the dictionaries, as for SparseSemanticCache, are counted apart


def parse_setting(text: str) -> tuple[int, int, int]:
    """ "8/16@5" -> (k_key, k_value, coefficient bits)."""
    budget, _, bits = text.partition("@")
    k_key, _, k_value = budget.partition("/")
    try:
        parsed = int(k_key), int(k_value), int(bits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is K_KEY/K_VALUE@BITS, e.g. 8/8@4; got {text!r}") from None
    if not 2 <= parsed[2] <= 8:
        raise argparse.ArgumentTypeError(f"coefficient bits must be 2 to 8, got {parsed[2]} in {text!r}")
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dictionary", default="sta-cache/SmolLM2-135M-Instruct")
    parser.add_argument(
        "--settings", default="8/8@4,8/8@5,12/12@4", help="K_KEY/K_VALUE@BITS, comma-separated: one row each"
    )
    parser.add_argument("--n-texts", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coefficient_bits"))
    args = parser.parse_args()
    settings = [parse_setting(s) for s in args.settings.split(",")]
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2")
    dictionary = KVDictionary.from_pretrained(args.dictionary)
    if dictionary.config.key_space != "pre_rope" or dictionary.config.encoder != "omp":
        raise SystemExit("this experiment codes keys by OMP before RoPE: give a pre-RoPE OMP dictionary")
    config = EvalConfig(
        context=args.context, n_texts=args.n_texts, prefill=512, chunk=64, passkey_trials=0, progress=False
    )
    window = dict(residual_length=config.residual_length, num_sink_tokens=config.num_sink_tokens, flush_tokens=16)
    texts = eval_texts(tokenizer, config.n_texts, config.context)
    specs = [CacheSpec("DynamicCache", "dynamic", "sdpa", lambda: DynamicCache(config=model.config), {})]
    for k_key, k_value, bits in settings:

        def make_cache(k_key=k_key, k_value=k_value, bits=bits):
            k = {"key": k_key, "value": k_value}
            return WindowedQuantizedCache(lambda i: LowBitCodesLayer(dictionary[i], k, bits, **window), model.config)

        params = {"k_key": k_key, "k_value": k_value, "coefficient_bits": bits, "scale": "float8_e4m3fn per vector"}
        specs.append(
            CacheSpec(f"STA {k_key}/{k_value}, {bits}-bit coefficients", "low-bit codes", "sdpa", make_cache, params)
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
