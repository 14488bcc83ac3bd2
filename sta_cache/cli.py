"""The ``sta-cache`` command line (also ``python -m sta_cache``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

DESCRIPTION = """\
STA-Attention KV-cache compression for Hugging Face transformers.

  sta-cache demo     generate with DynamicCache and SparseSemanticCache on the embedded SmolLM2-135M,
                     print both texts, memory saved and held-out perplexity
  sta-cache train    collect a model's cached keys/values over a text and train per-layer Top-K SAEs

Models: "smollm2" and "gemma3" are embedded (converted once from PyPI wheels); any local path or Hub id works too.
"""


def _add_dataclass_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--option`` per dataclass field, typed from its default."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif default is None:
            parser.add_argument(flag, default=None, type=_int_or_str, help="(default: unset)")
        else:
            parser.add_argument(flag, default=default, type=type(default), help=f"(default: {default})")


def _int_or_str(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:
        return value


def _options(args: argparse.Namespace, cls) -> dict:
    names = {field.name for field in dataclasses.fields(cls)}
    return {name: value for name, value in vars(args).items() if name in names}


def build_parser() -> argparse.ArgumentParser:
    from .demo import DemoConfig
    from .train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="sta-cache", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generate with and without compression on the embedded default model")
    _add_dataclass_options(demo, DemoConfig)

    train = commands.add_parser("train", help="train per-layer key/value dictionaries for a model")
    train.add_argument("--model", default="smollm2", help="smollm2, gemma3, a local folder or a Hub id")
    train.add_argument("--text", type=Path, default=None, help="UTF-8 text file (default: embedded Wikipedia train split)")
    train.add_argument("--out", type=Path, required=True, help="output folder (checkpoints are resumed from here)")
    _add_dataclass_options(train, TrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        run_demo(DemoConfig(**_options(args, DemoConfig)))
    elif args.command == "train":
        from .embedded import load_model, wikipedia_text
        from .train import TrainConfig, train_dictionary

        model, tokenizer = load_model(args.model)
        text = args.text or wikipedia_text("train")
        dictionary = train_dictionary(model, tokenizer, text, TrainConfig(**_options(args, TrainConfig)), args.out)
        print(f"saved {len(dictionary.config.layer_indices)} layers of dictionaries to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
