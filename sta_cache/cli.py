"""The ``sta-cache`` command line (also ``python -m sta_cache``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path

if typing.TYPE_CHECKING:
    import torch

DESCRIPTION = """\
STA-Attention KV-cache compression for Hugging Face transformers.

  sta-cache demo     generate with DynamicCache and SparseSemanticCache on the embedded SmolLM2-135M,
                     print both texts, memory saved and held-out perplexity
  sta-cache train    learn per-layer key/value dictionaries for a model from the keys/values it caches over a
                     text (MOD atoms for pursuit codes, the shipped recipe; or Top-K SAEs); runs under torchrun
  sta-cache analyze  semantic elbow (cosine/FVU vs k), elbow detection and suggested budget, key-value asymmetry
                     across depth, semantic atoms of a layer -> plots, results.json, report.md
  sta-cache eval     perplexity, next-token accuracy and passkey retrieval against measured bits per element for
                     DynamicCache, SparseSemanticCache budgets and KV quantizers (rotated Lloyd-Max, KIVI,
                     QuantizedCache) -> table, Pareto plots

Models: "smollm2" and "gemma3" are embedded (converted once from PyPI wheels); any local path or Hub id works too.
"""


def _add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per dataclass field: its help text, default and type, and the choices of ``Literal``
    fields."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        help = field.metadata["help"]
        kind = hints[field.name]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(
                flag, default=default, choices=typing.get_args(kind), help=f"{help} (default: {default})"
            )
        elif default is None:
            value_type = next(t for t in typing.get_args(kind) if t is not type(None))
            if typing.get_origin(value_type) is typing.Literal:
                parser.add_argument(flag, default=None, choices=typing.get_args(value_type), help=help)
            else:
                parser.add_argument(flag, default=None, type=value_type, help=help)
        else:
            parser.add_argument(flag, default=default, type=type(default), help=f"{help} (default: {default})")


def _add_training_inputs(parser: argparse.ArgumentParser) -> None:
    """The model, text and output folder of ``sta-cache train``."""
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local folder or a Hub id")
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--text", type=Path, default=None, help="UTF-8 text file (default: embedded Wikipedia train split)"
    )
    text.add_argument(
        "--dataset",
        default=None,
        help="a `datasets` dataset to stream the text from instead: a Hub id or a local folder of data files "
        "(needs the datasets package: pip install 'sta_cache[datasets]')",
    )
    parser.add_argument("--dataset-subset", default=None, help="the dataset's configuration name, if it has several")
    parser.add_argument("--dataset-split", default="train", help="the dataset's split (default: train)")
    parser.add_argument("--text-column", default="text", help="the dataset's text column (default: text)")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an interrupted run resumes from its checkpoint here)"
    )
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming a checkpoint in --out")
    parser.add_argument(
        "--device",
        default="auto",
        help="where the model runs and the dictionaries train: cpu, cuda, cuda:N, or auto (this process's GPU "
        "when CUDA is available, under torchrun the one of its LOCAL_RANK; else the CPU) (default: auto)",
    )


def _train(args: argparse.Namespace) -> None:
    """Load the model and text that ``args`` name, train, and say where the result went."""
    from .configs import TrainConfig
    from .distributed import world
    from .embedded import load_model, wikipedia_text
    from .text import TextSource
    from .training import train_dictionary

    config = TrainConfig(**_options(args, TrainConfig))
    if args.dataset is not None:
        text = TextSource(
            dataset=args.dataset, subset=args.dataset_subset, split=args.dataset_split, column=args.text_column
        )
    else:
        text = TextSource(path=args.text or wikipedia_text("train"))
    model, tokenizer = load_model(args.model)
    model.to(_training_device(args.device))
    dictionary = train_dictionary(model, tokenizer, text, config, args.out, resume=not args.restart)
    if world().main:
        evaluation = dictionary.config.evaluation or {}
        ratio = evaluation.get("perplexity_ratio")
        check = f"; held-out perplexity x{ratio} at {config.k_key}/{config.k_value}" if isinstance(ratio, float) else ""
        print(f"saved {len(dictionary.config.layer_indices)} layers of dictionaries to {args.out}{check}")


def _training_device(name: str) -> torch.device:
    """``--device``: ``auto`` is this process's GPU (the one of its ``LOCAL_RANK`` under torchrun) or the CPU."""
    import torch

    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device {name}: {err} (expected cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available in this torch build or on this machine")
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    return device


def _doc(cls) -> str:
    """A config dataclass's docstring as one paragraph, for a command's description."""
    return " ".join((cls.__doc__ or "").replace("``", "").split())


def _options(args: argparse.Namespace, cls) -> dict:
    names = {field.name for field in dataclasses.fields(cls)}
    return {name: value for name, value in vars(args).items() if name in names}


def build_parser() -> argparse.ArgumentParser:
    from .configs import DemoConfig, Encoder, PasskeyFeed, Pursuit, TrainConfig

    parser = argparse.ArgumentParser(
        prog="sta-cache", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="generate with and without compression on the embedded default model", description=_doc(DemoConfig)
    )
    _add_dataclass_options(demo, DemoConfig)

    train = commands.add_parser(
        "train",
        aliases=["train-pursuit"],
        help="learn per-layer key/value dictionaries for a model (MOD by default; --method sae for Top-K SAEs)",
        description=_doc(TrainConfig)
        + " Launch: `torchrun --nproc-per-node N -m sta_cache train ...` (gloo on CPU, nccl on GPU)."
        " train-pursuit is another name for train.",
    )
    _add_training_inputs(train)
    _add_dataclass_options(train, TrainConfig)

    analyze = commands.add_parser(
        "analyze",
        help="semantic elbow, K/V asymmetry and semantic atoms of a dictionary",
        description="Reproduce the paper's analyses for a dictionary on held-out text: reconstruction quality "
        "against k (the Semantic Elbow) with the elbow and a suggested budget per layer, the key-value asymmetry "
        "across depth, and the atoms of one layer. Writes plots, results.json and report.md to --out.",
    )
    analyze.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local folder or a Hub id")
    analyze.add_argument("--dictionary", required=True, help="trained dictionary folder or Hub id")
    analyze.add_argument("--out", type=Path, required=True, help="output folder (plots, results.json, report.md)")
    analyze.add_argument("--quick", action="store_true", help="fewer held-out vectors (a few minutes on 2 cores)")
    analyze.add_argument("--ks", type=_int_list, default=None, help="k grid (default 1,2,4,8,16,32,64)")
    analyze.add_argument("--layer", type=int, default=None, help="layer for the atom analysis (default: middle)")
    analyze.add_argument("--windows", type=int, default=None, help="held-out windows (default 24, quick 8)")
    analyze.add_argument("--context", type=int, default=None, help="tokens per held-out window (default 256)")
    analyze.add_argument(
        "--max-vectors",
        type=int,
        default=None,
        help="held-out vectors per layer and kind, a random subset beyond (default 16384, quick 4096)",
    )
    analyze.add_argument(
        "--encoder",
        choices=typing.get_args(Encoder),
        default=None,
        help="encoder to code with (default: the dictionary's)",
    )
    analyze.add_argument("--reference-k", type=int, default=None, help="k of the asymmetry comparison (default 8)")
    analyze.add_argument("--gain-threshold", type=float, default=None, help="gain rule threshold (default 0.01)")
    analyze.add_argument("--train-per-k", action="store_true", help="also train a small dictionary at each k (slow)")
    analyze.add_argument(
        "--train-tokens",
        type=int,
        default=None,
        help="training tokens per k with --train-per-k (default 30000, quick 8000)",
    )
    analyze.add_argument(
        "--train-text", default=None, help="training text for --train-per-k (default: Wikipedia train)"
    )
    analyze.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own setting)")

    evaluate = commands.add_parser(
        "eval",
        help="quality vs bits per element against DynamicCache and KV quantizers",
        description="Held-out perplexity, next-token accuracy and passkey retrieval against the bits per element "
        "each cache really stores, for DynamicCache, SparseSemanticCache budgets (fp8 coefficients and packed "
        "indices unless told), a rotated Lloyd-Max scalar quantizer (TurboQuant/PolarQuant style, several rotation "
        "seeds averaged), KIVI and transformers' QuantizedCache backends. Writes report.md, results.json and two "
        "Pareto plots (pareto.png; pareto_amortised.png with the dictionaries amortised) to --out.",
    )
    evaluate.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local folder or a Hub id")
    evaluate.add_argument("--dictionary", required=True, help="trained dictionary folder or Hub id")
    evaluate.add_argument("--out", type=Path, required=True, help="output folder (report.md, results.json, pareto.png)")
    evaluate.add_argument(
        "--quick", action="store_true", help="2 texts x 1k tokens, fewer configs, passkey at 2 depths"
    )
    evaluate.add_argument(
        "--context", type=int, default=None, help="tokens per held-out text (default 2048, quick 1024)"
    )
    evaluate.add_argument("--n-texts", type=int, default=None, help="held-out texts (default 4, quick 2)")
    evaluate.add_argument(
        "--text",
        dest="texts",
        action="append",
        default=None,
        help="a UTF-8 text file to evaluate on instead of the embedded held-out split, cut to --context tokens "
        "(repeat for several texts; each needs more than --prefill tokens)",
    )
    evaluate.add_argument("--prefill", type=int, default=None, help="prefill tokens before the chunks (default 256)")
    evaluate.add_argument("--chunk", type=int, default=None, help="tokens per chunk after the prefill (default 32)")
    evaluate.add_argument(
        "--window", dest="residual_length", type=int, default=None, help="dense recent window, tokens (default 64)"
    )
    evaluate.add_argument(
        "--sinks", dest="num_sink_tokens", type=int, default=None, help="dense sink tokens (default 4)"
    )
    evaluate.add_argument(
        "--budgets",
        type=_budget_list,
        default=None,
        help="k_key/k_value list (default 4/8,8/16,16/32); k_key/rB for values rotated and scalar-quantized at B bits "
        "per coordinate instead of coded by atoms (SparseSemanticCache(value_bits=B)), e.g. 8/16,10/r3",
    )
    evaluate.add_argument(
        "--target-bits",
        type=_float_list,
        default=None,
        help="bits per element, e.g. 2,3: one STA row each with the dictionary's best measured budget at or under "
        "it, as SparseSemanticCache(..., bits_per_element=B) picks it (alone, it replaces --budgets' default; "
        "default: 2,3 when the dictionary records measured budgets, as the shipped ones do)",
    )
    evaluate.add_argument(
        "--allocate-bits",
        type=_float_list,
        default=None,
        help="bits per element, e.g. 2.3,3: one STA row each whose atoms per layer and kind are allocated to fit it "
        "(coefficients and packing as the other STA rows) where the layer sensitivity says they lower the loss "
        "most. The sensitivity comes from --sensitivity, else the dictionary's config, else it is measured first "
        "on 2 x 768 tokens of the training split (one run per layer, kind and atom count: ~30 min for SmolLM2) and "
        "saved to OUT/sensitivity.json (and into the dictionary with --record-budgets). Alone, it replaces "
        "--budgets' default",
    )
    evaluate.add_argument(
        "--sensitivity",
        default=None,
        help="a sensitivity.json that an earlier eval wrote, for --allocate-bits (instead of measuring again)",
    )
    evaluate.add_argument(
        "--sensitivity-atoms",
        type=_int_list,
        default=None,
        help="the atom counts a layer and kind may get, each measured when the sensitivity is (default "
        "4,6,8,12,16,24; a long head_dim wants more, e.g. 16,24,32,48,64 for Gemma-3)",
    )
    evaluate.add_argument(
        "--record-budgets",
        action="store_true",
        default=None,
        help="write the STA rows' bits per element and perplexity ratios into the dictionary folder's config.json "
        "('measured'), where bits_per_element= and --target-bits choose from (a local folder, not a Hub id); with "
        "--allocate-bits also the layer sensitivity ('sensitivity')",
    )
    evaluate.add_argument(
        "--paths", type=_str_list, default=None, help="attention paths for STA, among sta,sdpa (default both)"
    )
    evaluate.add_argument(
        "--baselines",
        type=_str_list,
        default=None,
        help="baselines: rotated:BITS (rotated Lloyd-Max quantizer), kivi:BITS[:GROUP] (group 32 unless given) and "
        "QuantizedCache backends BACKEND:BITS (default rotated:2,rotated:2.5,rotated:3,rotated:3.5,kivi:2:32,"
        "quanto:4,quanto:2,hqq:4,hqq:2,fp8; 'none' for none)",
    )
    evaluate.add_argument(
        "--rotation-seeds",
        type=_int_list,
        default=None,
        help="rotation seeds of the rotated quantizer, each run once and averaged (default 0,1,2)",
    )
    evaluate.add_argument(
        "--encoder", choices=typing.get_args(Encoder), default=None, help="STA encoder (default: the dictionary's)"
    )
    evaluate.add_argument(
        "--value-pursuit",
        choices=typing.get_args(Pursuit),
        default=None,
        help="how STA picks value atoms with a pursuit dictionary: mp (matching pursuit, the default) or omp "
        "(orthogonal, the exact and slower one); keys always use omp",
    )
    evaluate.add_argument("--q-group-size", type=int, default=None, help="QuantizedCache group size (default 64)")
    evaluate.add_argument(
        "--coefficient-dtypes",
        type=_dtype_list,
        default=None,
        help="STA coefficient storage, one row each: float32, float16, bfloat16, float8_e4m3fn (the default), or "
        "int2 ... int8: B-bit levels on one float8 scale per vector (coefficient_bits=B; int4 at 8/8 is the best "
        "measured setting near 2 bits per element)",
    )
    evaluate.add_argument(
        "--pack-indices",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="STA: pack indices into ceil(log2 N) bits (default: on)",
    )
    evaluate.add_argument(
        "--max-context", type=int, default=None, help="longest passkey prompt (default 4096, quick 1024)"
    )
    evaluate.add_argument(
        "--passkey-depths",
        type=_float_list,
        default=None,
        help="where the key sits, as fractions of the filler before it (default 0.1,0.3,0.5,0.7,0.9; quick 0.25,0.75)",
    )
    evaluate.add_argument(
        "--passkey-trials", type=int, default=None, help="keys per length and depth (default 2, quick 1)"
    )
    evaluate.add_argument(
        "--passkey-feed",
        choices=typing.get_args(PasskeyFeed),
        default=None,
        help="passkey prompt: one prefill as model.generate (default) or chunked like perplexity",
    )
    evaluate.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own setting)")
    return parser


def _str_list(value: str) -> list[str]:
    return [] if value.strip().lower() == "none" else [v.strip() for v in value.split(",") if v.strip()]


def _dtype_list(value: str) -> list[str]:
    from .configs import CoefficientDtype

    names, valid = _str_list(value), typing.get_args(CoefficientDtype)
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"coefficient storages must be among {', '.join(valid)}, got {value!r}")
    return names


def _int_list(value: str) -> list[int]:
    return [int(v) for v in _str_list(value)]


def _float_list(value: str) -> list[float]:
    return [float(v) for v in _str_list(value)]


def _budget_list(value: str) -> list[tuple[int, int | None, int | None]]:
    """``8/16,10/r3,12`` -> ``(k_key, k_value, None)`` or ``(k_key, None, value_bits)`` each (``12``: 12/12)."""
    budgets = []
    for item in _str_list(value):
        key, _, val = item.partition("/")
        try:
            if val.startswith("r"):
                budgets.append((int(key), None, int(val[1:])))
            else:
                budgets.append((int(key), int(val or key), None))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a budget is k_key/k_value (8/16) or k_key/rB (10/r3: values rotated at B bits), got {item!r}"
            ) from None
    return budgets


def _eval_options(args: argparse.Namespace) -> dict:
    """EvalConfig fields from the parsed arguments: --budgets splits into atom and rotated-value budgets."""
    options = {k: v for k, v in vars(args).items() if k not in ("command", "quick")}
    budgets = options.pop("budgets")
    if budgets is not None:
        options["budgets"] = [(k_key, k_value) for k_key, k_value, bits in budgets if bits is None]
        options["rotated_budgets"] = [(k_key, bits) for k_key, _, bits in budgets if bits is not None]
    return {**options, "out": str(args.out)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        run_demo(DemoConfig(**_options(args, DemoConfig)))
    elif args.command in ("train", "train-pursuit"):
        _train(args)
    elif args.command == "analyze":
        from .configs import AnalyzeConfig
        from .evaluation import run_analysis

        options = {k: v for k, v in vars(args).items() if k not in ("command", "quick", "train_per_k")}
        config = AnalyzeConfig.preset(
            args.quick, **{**options, "out": str(args.out)}, train_per_k=args.train_per_k or None
        )
        results = run_analysis(config)
        budget = results["suggested_budget"]
        print(f"suggested budget k_key={budget['k_key']} k_value={budget['k_value']}; report: {args.out / 'report.md'}")
    elif args.command == "eval":
        from .budgets import NotADictionaryFolder
        from .configs import EvalConfig
        from .evaluation import run_eval
        from .evaluation.inputs import TextFileError

        config = EvalConfig.preset(args.quick, **_eval_options(args))
        try:
            run_eval(config)
        except (TextFileError, NotADictionaryFolder) as error:
            print(f"sta-cache eval: error: {error}", file=sys.stderr)
            return 2
        print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
