"""The settings of every ``sta-cache`` command, as dataclasses, and the ``Literal`` types of their mode strings.

The command line derives one ``--option`` per field of the ``demo`` and ``train`` settings from
these (help, default, and the choices of ``Literal`` fields); ``analyze`` and ``eval`` have presets (full or
``--quick``) that fill what the command line leaves unset. This module imports nothing heavy: ``sta-cache --help``
never loads torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

KeySpace = Literal["pre_rope", "post_rope"]
Encoder = Literal["omp", "topk"]
# How a pursuit ("omp") dictionary's encoder picks atoms: orthogonal matching pursuit, or matching pursuit with the
# same least-squares coefficients (kernels/reference.py, omp_encode_reference)
Pursuit = Literal["omp", "mp"]
AtomInit = Literal["data", "random"]
BiasInit = Literal["geometric_median", "mean", "zero"]
WeightDtype = Literal["float32", "float16", "bfloat16"]
# How a cache stores coefficients: a float dtype, or intB: B-bit levels on a float8 scale per vector
CoefficientDtype = Literal[
    "float32", "float16", "bfloat16", "float8_e4m3fn", "int2", "int3", "int4", "int5", "int6", "int7", "int8"
]
TrainMethod = Literal["mod", "sae"]  # how `sta-cache train` learns atoms (TrainConfig)
Shard = Literal["data", "layers"]  # how `sta-cache train` splits its work over torchrun processes
PasskeyFeed = Literal["generate", "chunked"]  # one prefill as model.generate, or prefill + chunks as perplexity

DEFAULT_SINKS = 4  # SparseSemanticCache keeps the first 4 tokens dense: no need to learn them
DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64)  # the k grid of `sta-cache analyze`
DEFAULT_BUDGETS = ((4, 8), (8, 16), (16, 32))  # (k_key, k_value) rows of `sta-cache eval`
# sizes `sta-cache eval` also shows by default, as bits_per_element= serves them, for a dictionary that records budgets
DEFAULT_TARGET_BITS = (2.0, 3.0)
# Baseline rows of `sta-cache eval`: the rotated Lloyd-Max quantizer (sta_cache.baselines.rotated) at 2-3.5 bits per
# coordinate, KIVI-2 with groups of 32 (sta_cache.baselines.kivi), and transformers' QuantizedCache backends.
DEFAULT_BASELINES = (
    "rotated:2",
    "rotated:2.5",
    "rotated:3",
    "rotated:3.5",
    "kivi:2:32",
    "quanto:4",
    "quanto:2",
    "hqq:4",
    "hqq:2",
    "fp8",
)
DEFAULT_ROTATION_SEEDS = (0, 1, 2)  # the rotated quantizer's quality depends on the draw: rows average these


def option(default: Any, help: str) -> Any:
    """A dataclass field whose ``help`` the command line shows."""
    return field(default=default, metadata={"help": help})


def check_choice(name: str, value: Any, choices: Any, hint: str = "") -> None:
    """``value`` must be one of ``choices`` (a tuple of strings, or a ``Literal`` type), case-sensitive: a near miss
    is pointed out. Not a string: ``TypeError``; another string: ``ValueError``."""
    choices = get_args(choices) or tuple(choices)
    valid = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {valid}, got {value!r} ({type(value).__name__}){hint}")
    if value not in choices:
        near = f"; did you mean {value.lower()!r}?" if value.lower() in choices else ""
        raise ValueError(f"{name} must be one of {valid}, got {value!r}{near}{hint}")


@dataclass
class DemoConfig:
    """Generate from a held-out prompt with DynamicCache and with SparseSemanticCache, print both continuations,
    the bytes each cache holds and held-out perplexity."""

    model: str = option(
        "smollm2",
        "model: 'smollm2' or 'gemma3' (embedded, converted once from PyPI wheels), a local folder or a Hub id",
    )
    dictionary: str | None = option(
        None,
        "dictionary folder or Hub id (default: the one shipped for the model; "
        "for other models small ones are trained once)",
    )
    prompt: str | None = option(None, "prompt text (default: the start of a held-out Wikipedia article)")
    prompt_tokens: int = option(512, "tokens of the default prompt")
    max_new_tokens: int = option(60, "tokens to generate (greedy)")
    k_key: int | None = option(None, "atoms per key (default: the dictionary's budget, 8 for the shipped ones)")
    k_value: int | None = option(None, "atoms per value (default: the dictionary's budget, 16 for the shipped ones)")
    residual_length: int = option(64, "most recent tokens kept dense")
    num_sink_tokens: int = option(4, "first tokens kept dense (attention sinks)")
    eval_texts: int = option(2, "held-out texts for the perplexity comparison")
    eval_tokens: int = option(1024, "tokens per held-out text; also the context of the memory comparison")
    prefill: int = option(256, "perplexity: tokens fed as one prefill before scoring starts")
    chunk: int = option(32, "perplexity: tokens fed per step after the prefill, as generation feeds a cache")


@dataclass
class TrainConfig:
    """Per-layer key and value dictionaries learned from the keys and values a model caches over a text.

    Two methods. ``mod`` (the default, and the recipe of the shipped dictionaries): atoms learned for the codes the
    cache really stores, orthogonal-matching-pursuit codes, by the Method of Optimal Directions over a random
    sample of ``vectors`` vectors per dictionary. ``sae``: Top-K sparse autoencoders trained by gradient descent,
    the text read once into reservoirs of ``buffer_size`` vectors per dictionary (all together at most
    ``buffer_mb`` MiB) replayed ``epochs`` times. Sizes count vectors of one dictionary (one layer, one kind, one
    head group). Under ``torchrun --nproc-per-node N`` the work is split over N processes by text or by layers
    (``shard``); rank 0 writes the dictionary.
    """

    method: TrainMethod = option(
        "mod",
        "mod: atoms for matching-pursuit codes by the Method of Optimal Directions (the shipped recipe: x1.006 "
        "held-out perplexity at 8/16 on SmolLM2); sae: Top-K sparse autoencoders by gradient descent (x1.0072 "
        "against MOD's x1.0058 on the same texts, both coded by OMP with pre-RoPE keys; LAB_NOTES.md)",
    )
    n_atoms: int = option(1024, "atoms per dictionary (N)")
    k_key: int = option(8, "atoms per key the dictionary is trained and saved for")
    k_value: int = option(16, "atoms per value the dictionary is trained and saved for")
    key_space: KeySpace = option(
        "pre_rope",
        "code keys un-rotated by their position (pre_rope: x1.008 against x1.031 post_rope at 8/16 fp8 on held-out "
        "text, LAB_NOTES.md) or as cached (post_rope: the paper's setting, faster decode)",
    )
    encoder: Encoder | None = option(
        None,
        "encoder the cache codes with: omp (orthogonal matching pursuit; the only one for mod) or topk (the SAE's "
        "one-shot encoder; default for sae)",
    )
    per_head: bool = option(False, "one dictionary per KV head instead of one shared by the layer's heads")
    context: int = option(256, "tokens per window fed to the model")
    max_tokens: int | None = option(
        None, "training tokens read from the text (default: 12,288 for mod, 48 windows; 60,000 for sae)"
    )
    eval_tokens: int = option(
        2048, "held-out tokens (after the training tokens) for the final check: reconstruction and perplexity"
    )
    check_perplexity: bool = option(
        True, "end with the held-out perplexity ratio at k_key/k_value against DynamicCache (in the model card)"
    )
    skip_first: int = option(DEFAULT_SINKS, "first positions of each window left out (the cache keeps its sinks dense)")
    batch_windows: int = option(4, "windows per model forward while collecting")
    shard: Shard = option(
        "data",
        "under torchrun: data (each process reads its share of the text; MOD statistics are summed and SAE "
        "gradients averaged over the processes) or layers (each process reads all the text and trains its share "
        "of the layers)",
    )
    seed: int = option(0, "random seed (a run resumed from its checkpoint gives the same weights)")
    dtype: WeightDtype = option("float32", "dtype of the saved weights")
    base_model: str | None = option(None, "model name recorded in the dictionary (default: the model's own)")
    # mod
    vectors: int = option(16000, "mod: training vectors per dictionary (a random sample of those collected)")
    iterations: int = option(6, "mod: iterations (pursuit codes, then a least-squares refit of all atoms)")
    # sae
    epochs: float = option(2.0, "sae: average times each collected vector is trained on")
    steps: int | None = option(None, "sae: optimiser steps (default: derived from --epochs)")
    batch_size: int = option(1024, "sae: vectors per step and dictionary")
    lr: float = option(4e-3, "sae: Adam learning rate")
    warmup_steps: int = option(20, "sae: steps of linear learning-rate warm-up")
    decay_fraction: float = option(0.3, "sae: final fraction of the steps with linear decay to zero")
    aux_k: int | None = option(None, "sae: dead atoms the AuxK loss revives per vector (default: head_dim / 2)")
    aux_coef: float = option(1 / 32, "sae: weight of the AuxK loss")
    dead_steps: int = option(32, "sae: steps without firing after which an atom counts as dead")
    buffer_size: int = option(32768, "sae: reservoir vectors per dictionary")
    buffer_mb: float = option(512.0, "sae: MiB all reservoirs may hold together")
    init: AtomInit = option("data", "sae: atoms start at random centred training vectors (data) or random directions")
    b_dec_init: BiasInit = option(
        "geometric_median", "sae: decoder bias starts at the data's geometric median, mean, or zero"
    )
    eval_vectors: int = option(4096, "held-out vectors per dictionary for the reconstruction check")
    eval_vectors_omp: int = option(1024, "sae: held-out vectors per dictionary for its OMP evaluation")
    log_every: int = option(25, "sae: steps between log lines (train_log.jsonl)")
    eval_every: int = option(0, "sae: steps between held-out evaluations during training (0: at the end only)")
    checkpoint_every: int = option(100, "sae: steps between checkpoints (an interrupted run resumes from the last)")

    def __post_init__(self) -> None:
        check_choice("method", self.method, TrainMethod)
        check_choice("key_space", self.key_space, KeySpace)
        check_choice("shard", self.shard, Shard)
        check_choice("init", self.init, AtomInit)
        check_choice("b_dec_init", self.b_dec_init, BiasInit)
        check_choice("dtype", self.dtype, WeightDtype)
        if self.encoder is None:
            self.encoder = "omp" if self.method == "mod" else "topk"
        check_choice("encoder", self.encoder, Encoder)
        if self.method == "mod" and self.encoder != "omp":
            raise ValueError("method='mod' learns atoms for pursuit codes: its encoder is 'omp'")
        if self.max_tokens is None:
            self.max_tokens = 48 * 256 if self.method == "mod" else 60_000
        for name in ("k_key", "k_value"):
            if not 1 <= getattr(self, name) <= self.n_atoms:
                raise ValueError(f"{name} must be between 1 and n_atoms={self.n_atoms}")
        if self.context <= self.skip_first:
            raise ValueError(f"context={self.context} must exceed skip_first={self.skip_first}")
        for name in ("max_tokens", "eval_tokens", "vectors", "iterations", "batch_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 1 or self.buffer_size < self.batch_size:
            raise ValueError("need 1 <= batch_size <= buffer_size")

    def weights_fingerprint(self) -> dict:
        """The fields that determine the trained weights (a resumed run must agree on all of them)."""
        not_affecting = {"log_every", "eval_every", "checkpoint_every", "base_model", "check_perplexity", "shard"}
        return {k: v for k, v in asdict(self).items() if k not in not_affecting}


@dataclass
class AnalyzeConfig:
    """What ``sta-cache analyze`` runs; :meth:`preset` gives the full or ``--quick`` defaults."""

    model: str = "smollm2"
    dictionary: str | None = None
    out: str = "analyze_out"
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    context: int = 256  # tokens per held-out window
    windows: int = 24  # held-out windows (the vectors of every layer come from the same windows)
    skip_first: int = 4  # sink positions the cache keeps dense: left out of the statistics
    max_vectors: int = 16384  # per layer and kind (random subset beyond that)
    encoder: Encoder | None = None  # None: the dictionary's own
    layer: int | None = None  # layer for the atom analysis (None: the middle compressed layer)
    reference_k: int = 8  # k at which the asymmetry figure compares keys and values
    gain_threshold: float = 0.01  # elbow_gain: cosine gained by the next doubling of k
    top_atoms: int = 10
    examples: int = 5
    train_per_k: bool = False
    train_tokens: int = 30_000  # per-k training text (tokens) with train_per_k
    train_epochs: float = 2.0
    train_text: str | None = None  # per-k training text (default: the embedded Wikipedia train split)
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.encoder is not None:
            check_choice("encoder", self.encoder, Encoder)

    @classmethod
    def preset(cls, quick: bool, **overrides) -> AnalyzeConfig:
        """Full defaults, or the ``--quick`` ones; ``None`` overrides are ignored."""
        base = dict(windows=8, max_vectors=4096, train_tokens=8_000, train_epochs=1.0) if quick else {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class EvalConfig:
    """What ``sta-cache eval`` runs. :meth:`preset` gives the full or the ``--quick`` defaults."""

    model: str = "smollm2"
    dictionary: str | None = None
    out: str = "eval_out"
    context: int = 2048  # tokens per held-out text (perplexity window)
    n_texts: int = 4
    prefill: int = 256
    chunk: int = 32
    residual_length: int = 64  # SparseSemanticCache window (QuantizedCache gets the same residual length)
    num_sink_tokens: int = 4
    texts: list[str] | None = None  # UTF-8 files evaluated instead of the embedded held-out split (one text each)
    budgets: list[tuple[int, int]] = field(default_factory=lambda: [tuple(b) for b in DEFAULT_BUDGETS])
    # (k_key, value_bits) rows: key atoms, values rotated at value_bits bits per coordinate (rotated_values.py)
    rotated_budgets: list[tuple[int, int]] = field(default_factory=list)
    # bits per element: one STA row each, the dictionary's best measured budget at or under it (bits_per_element=);
    # None: DEFAULT_TARGET_BITS if the dictionary records measured budgets, else none
    target_bits: list[float] | None = None
    # bits per element: one STA row each with atoms per layer and kind allocated from the layer sensitivity
    allocate_bits: list[float] = field(default_factory=list)
    sensitivity: str | None = None  # a sensitivity.json to allocate from (else the dictionary's, else measured)
    sensitivity_atoms: list[int] = field(default_factory=lambda: [4, 6, 8, 12, 16, 24])  # atom counts it measures
    record_budgets: bool = False  # write the STA rows' measurements into the dictionary folder's config.json
    paths: list[str] = field(default_factory=lambda: ["sta", "sdpa"])  # attention paths for SparseSemanticCache
    sdpa_budgets: list[tuple[int, int]] | None = None  # budgets also run on "sdpa" (None: all budgets)
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    rotation_seeds: list[int] = field(default_factory=lambda: list(DEFAULT_ROTATION_SEEDS))
    q_group_size: int = 64  # QuantizedCache (quanto / hqq) group size
    encoder: Encoder | None = None  # None: the dictionary's own
    value_pursuit: Pursuit = "mp"  # how a pursuit dictionary's cache picks value atoms (SparseSemanticCache)
    # STA storage: our best by default (fp8 coefficients, packed indices); None in the list: the model's dtype
    coefficient_dtypes: list[CoefficientDtype | None] = field(default_factory=lambda: ["float8_e4m3fn"])
    pack_indices: bool = True
    max_context: int = 4096
    passkey_lengths: list[int] | None = None  # None: powers of two from 512 up to max_context
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    passkey_trials: int = 2
    passkey_new_tokens: int = 8
    passkey_feed: PasskeyFeed = "generate"
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.encoder is not None:
            check_choice("encoder", self.encoder, Encoder)
        check_choice("value_pursuit", self.value_pursuit, Pursuit)
        for name in self.coefficient_dtypes:
            if name is not None:
                check_choice("coefficient dtype", name, CoefficientDtype)
        check_choice("passkey_feed", self.passkey_feed, PasskeyFeed)
        for bits in (self.target_bits or []) + self.allocate_bits:
            if not bits > 0:
                raise ValueError(f"target bits per element must be positive, got {bits}")
        if not self.rotation_seeds:
            raise ValueError("rotation_seeds must name at least one seed")

    @classmethod
    def preset(cls, quick: bool, **overrides) -> EvalConfig:
        """Full defaults, or the ``--quick`` ones (SmolLM2 on 2 cores in a few minutes); ``None`` overrides are
        ignored."""
        base = {}
        if quick:
            base = dict(
                context=1024,
                n_texts=2,
                paths=["sta", "sdpa"],
                sdpa_budgets=[(8, 16)],
                max_context=1024,
                passkey_lengths=[1024],
                passkey_depths=[0.25, 0.75],
                passkey_trials=1,
                baselines=["rotated:2", "rotated:3", "kivi:2:32", "quanto:4", "quanto:2", "fp8"],
                rotation_seeds=[0, 1],
            )
        base.update({k: v for k, v in overrides.items() if v is not None})
        if (overrides.get("target_bits") or overrides.get("allocate_bits")) and overrides.get("budgets") is None:
            base["budgets"] = []  # --target-bits / --allocate-bits alone evaluate exactly the budgets they choose
        return cls(**base)

    def sizes(self, has_measured_budgets: bool) -> list[float]:
        """The ``target_bits`` rows to run: the given ones, else the default sizes if the dictionary records any
        measured budget (our storage at its best beside the fixed budgets), else none."""
        if self.target_bits is not None:
            return list(self.target_bits)
        return list(DEFAULT_TARGET_BITS) if has_measured_budgets else []

    def lengths(self) -> list[int]:
        """Passkey prompt lengths: the given ones (capped at ``max_context``), else powers of two from 512."""
        if self.passkey_lengths:
            return sorted({min(n, self.max_context) for n in self.passkey_lengths})
        lengths, n = [], 512
        while n < self.max_context:
            lengths.append(n)
            n *= 2
        return lengths + [self.max_context]
