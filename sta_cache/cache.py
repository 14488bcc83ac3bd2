"""SparseSemanticCache: a drop-in transformers ``Cache`` that stores Top-K SAE codes instead of dense keys/values."""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Sequence

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from . import distributed, geometry
from .attention import hand_over
from .budgets import best_budget
from .configs import Pursuit
from .dictionary import KVDictionary
from .geometry import FULL_ATTENTION, SLIDING_LAYER_TYPES
from .layer import SparseSemanticLayer
from .memory import owned, storage_bytes
from .validation import check_cache_arguments, per_layer_atoms

DEFAULT_RESIDUAL_LENGTH = 64
DEFAULT_NUM_SINK_TOKENS = 4
DEFAULT_ENCODE_BATCH = 16


class UnsupportedModelError(ValueError):
    """The model's attention cannot be served by this cache, or the dictionary was made for another model."""


def check_model_fits(dictionary: KVDictionary, config: PretrainedConfig) -> list[str]:
    """Raise :class:`UnsupportedModelError` naming every mismatch between ``dictionary`` and the model ``config``;
    return the model's per-layer attention types."""
    config = config.get_text_config()
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise UnsupportedModelError(
            f"{config.model_type} uses multi-head latent attention (MLA): its cache holds a compressed latent, not "
            "per-head keys and values, and SparseSemanticCache cannot serve it"
        )
    if getattr(config, "layer_types", None) and any(
        t not in (FULL_ATTENTION, *SLIDING_LAYER_TYPES) for t in config.layer_types
    ):
        others = sorted(set(config.layer_types) - {FULL_ATTENTION, *SLIDING_LAYER_TYPES})
        raise UnsupportedModelError(f"{config.model_type} has layers of type {others}, which this cache cannot serve")
    meta = dictionary.config
    heads, head_dim = geometry.num_kv_heads(config), geometry.head_dim(config)
    problems = []
    if config.num_hidden_layers != meta.num_layers:
        problems.append(f"{config.num_hidden_layers} layers (dictionary: {meta.num_layers})")
    if heads != meta.num_kv_heads:
        problems.append(f"{heads} KV heads (dictionary: {meta.num_kv_heads})")
    if head_dim != meta.head_dim:
        problems.append(f"head_dim {head_dim} (dictionary: {meta.head_dim})")
    if problems:
        raise UnsupportedModelError(
            f"the dictionary was made for {meta.base_model} and does not fit this {config.model_type} model: the "
            f"model has {', '.join(problems)}"
        )
    layer_types = geometry.layer_types(config)
    sliding_with_saes = [i for i in meta.layer_indices if layer_types[i] in SLIDING_LAYER_TYPES]
    if sliding_with_saes:
        raise UnsupportedModelError(
            f"layers {sliding_with_saes} are sliding-window layers, which keep a bounded dense cache; the dictionary "
            "should not hold SAEs for them"
        )
    if meta.key_space == "pre_rope":
        check_rotary_fits(dictionary, config, layer_types)
    return layer_types


def rotary_from_config(config: PretrainedConfig, layer_type: str | None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` that transformers' rotary embedding computes at init for layers of
    ``layer_type`` of a model built from the text ``config`` (``rope_parameters``: rope_theta, rope_type and its
    scaling, partial_rotary_factor; per layer type where the config has one set per type, as Gemma-3's)."""
    config = copy.deepcopy(config)  # transformers' rope functions standardize the config they are given in place
    config.standardize_rope_params()
    parameters = config.rope_parameters
    per_type = layer_type is not None and isinstance(parameters.get(layer_type), dict)
    parameters = parameters[layer_type] if per_type else parameters
    rope_type = parameters.get("rope_type", "default")
    if rope_type != "default":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=layer_type if per_type else None)
        return inv_freq.float(), float(scaling)
    partial = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    dim = int(geometry.head_dim(config) * partial)
    return 1.0 / parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim), 1.0


def check_rotary_fits(dictionary: KVDictionary, config: PretrainedConfig, layer_types: list[str]) -> None:
    """Pre-RoPE codes are re-rotated with the dictionary's frequencies and ``rope_scaling``: raise
    :class:`UnsupportedModelError` if those are not the model's (another rope_theta, rope scaling or model), which
    would rotate every compressed key wrongly. Warn instead if the model's cannot be computed from its config."""
    meta = dictionary.config
    for i in meta.layer_indices:
        try:
            inv_freq, scaling = rotary_from_config(config, layer_types[i])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            warnings.warn(
                f"could not compute the rotary frequencies of {config.model_type} from its config ({error!r}); the "
                "pre-RoPE dictionary's frequencies are not checked against the model",
                UserWarning,
                stacklevel=4,
            )
            return
        stored = dictionary[i].rope_inv_freq.cpu()
        if stored.shape != inv_freq.shape or not torch.allclose(stored, inv_freq, rtol=1e-4, atol=0):
            raise UnsupportedModelError(
                f"the pre-RoPE dictionary ({meta.base_model}) rotates keys with other frequencies than this "
                f"{config.model_type} model: layer {i} has inv_freq {_leading(inv_freq)} ({inv_freq.numel()} "
                f"frequencies), the dictionary {_leading(stored)} ({stored.numel()}); it was made for another "
                "rope_theta, rope scaling or model, and would rotate every compressed key wrongly"
            )
        if not math.isclose(meta.rope_scaling, scaling, rel_tol=1e-4):
            raise UnsupportedModelError(
                f"the pre-RoPE dictionary ({meta.base_model}) has rope_scaling {meta.rope_scaling}, this "
                f"{config.model_type} model scales its rotary embedding by {scaling}: it was made for another model"
            )


def model_config(config: PretrainedConfig | None, model: torch.nn.Module | None) -> PretrainedConfig | None:
    """The model config that ``config=`` or ``model=`` gives (``model=model`` is short for
    ``config=model.config``); checks what was passed."""
    if model is not None:
        if config is not None:
            raise TypeError("pass config= or model=, not both (model=model is short for config=model.config)")
        config = getattr(model, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise TypeError(f"model= must be a transformers model with a .config, got {type(model).__name__}")
    if config is not None and not isinstance(config, PretrainedConfig):
        raise TypeError(f"config must be a transformers PretrainedConfig (model.config), got {type(config).__name__}")
    return config


def _as_given(atoms: int | Sequence[int] | None) -> int | tuple[int, ...] | None:
    """A budget as the cache keeps it: an int for every layer, or a tuple of one per dictionary layer."""
    return tuple(atoms) if isinstance(atoms, Sequence) else atoms


def _leading(values: torch.Tensor) -> str:
    """The first three values of a vector, for a message."""
    return "[" + ", ".join(f"{v:.4g}" for v in values[:3].tolist()) + ", ...]"


class CompactSlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, except that after a prefill or chunk it keeps a compact copy of its
    window instead of a view of all the chunk's keys and values (which keeps the whole prompt alive). After a
    one-token step its window is a view of one token more than it shows, as in transformers."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] > 1 and not self.record_past:
            self.keys, self.values = owned(self.keys), owned(self.values)
        return keys, values


class SparseSemanticCache(Cache):
    """A transformers ``Cache`` whose attention layers keep Top-K sparse codes (STA-Attention).

    Per batch row, KV head and token it stores ``k_key`` atom indices + coefficients for the key and ``k_value``
    for the value; only the first ``num_sink_tokens`` real tokens (attention sinks) and the most recent
    ``residual_length`` tokens stay dense; tokens that have left the window are encoded ``encode_batch`` at a
    time. Layers without a dictionary stay dense (sliding-window layers, such as Gemma-3's local layers, keep
    transformers' own bounded sliding cache).

    Pass ``config=model.config`` (or ``model=model``) to check the dictionary against the model before anything
    runs (layers, KV heads, head_dim and, for pre-RoPE dictionaries, the rotary frequencies), and to lay out
    sliding-window layers; without it a model with other KV heads or head_dim, or more layers, is refused at its
    first forward. Use ``attn_implementation="sta"`` (see :mod:`sta_cache.attention`) to attend from the codes
    directly; any other implementation gets the compressed tokens rebuilt densely by ``update``.

    ``k_key`` / ``k_value`` (ints from 1 to the dictionary's N atoms) default to the dictionary's budget (8 / 16
    unless it says otherwise); a list of one int per dictionary layer (``dictionary.config.layer_indices`` order)
    gives each layer its own budget. ``coefficient_dtype`` stores coefficients in another float dtype than the model's
    (a ``torch.dtype``, e.g. ``torch.float8_e4m3fn``; not a string; values beyond its range are clamped, with a
    warning); ``coefficient_bits=b`` (2 to 8) stores each vector's coefficients as signed b-bit levels on one
    float8 scale instead (4 bits at 8/8 measured the best use of bits near 2 bits per element, README "Quality");
    ``pack_indices=True`` packs each index into ceil(log2 N) bits (N <= 65536).
    ``bits_per_element=B`` chooses those instead: the setting with the lowest held-out perplexity ratio at or
    under B bits per element among those the dictionary records as measured (``dictionary.config.measured``,
    written by ``sta-cache eval --record-budgets``); ``cache.budget`` says which and what it measured.
    ``backend`` is ``"auto"`` (Triton on CUDA; on the CPU the fused C kernels, built once with the system C
    compiler, or PyTorch where they cannot be built), ``"torch"``, ``"triton"`` or ``"cpu"`` (the C kernels).
    ``value_pursuit`` says how a pursuit dictionary codes values: ``"mp"`` (default) picks atoms by matching
    pursuit, ``"omp"`` by orthogonal matching pursuit, both with least-squares coefficients; "mp" costs a fraction
    of "omp" on the CPU at the same held-out perplexity (README "Speed"). Keys always use OMP: matching pursuit
    loses measurably there. ``value_bits=b`` (2 to 8) stores values not as atoms but rotated and scalar-quantized,
    b bits per coordinate and one float8 gain per vector (:mod:`sta_cache.rotated_values`; ``k_value`` then does not
    apply): near-free to encode, and at equal bits as good as atoms or better (README "Quality").
    Every argument is checked here; a failed ``update`` leaves each layer as it was.

    Under tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``) each rank's cache holds
    its own KV heads, coded with its share of a per-head dictionary: pass ``model=model`` and the cache reads the
    model's tensor-parallel group; without it, it takes all processes to be that group (right for plain
    ``torchrun`` tensor parallelism; the heads a layer is given are checked against it either way).
    ``memory_footprint(across_ranks=True)`` sums the group's bytes.
    """

    def __init__(
        self,
        dictionary: KVDictionary,
        *,
        k_key: int | Sequence[int] | None = None,
        k_value: int | Sequence[int] | None = None,
        residual_length: int = DEFAULT_RESIDUAL_LENGTH,
        num_sink_tokens: int = DEFAULT_NUM_SINK_TOKENS,
        encode_batch: int = DEFAULT_ENCODE_BATCH,
        config: PretrainedConfig | None = None,
        model: torch.nn.Module | None = None,
        coefficient_dtype: torch.dtype | None = None,
        coefficient_bits: int | None = None,
        pack_indices: bool | None = None,
        backend: str = "auto",
        value_pursuit: Pursuit = "mp",
        value_bits: int | None = None,
        bits_per_element: float | None = None,
    ):
        if not isinstance(dictionary, KVDictionary):
            load = isinstance(dictionary, (str, os.PathLike))
            raise TypeError(
                f"dictionary must be a KVDictionary, got {type(dictionary).__name__}"
                + (f": load {dictionary!r} with SparseSemanticCache.from_pretrained(...)" if load else "")
            )
        config = model_config(config, model)
        self.ranks = distributed.tensor_parallel(model) if model is not None else distributed.world()
        meta = dictionary.config
        self.budget = None
        if bits_per_element is not None:
            given = dict(
                k_key=k_key,
                k_value=k_value,
                coefficient_dtype=coefficient_dtype,
                coefficient_bits=coefficient_bits,
                pack_indices=pack_indices,
                value_bits=value_bits,
            )
            named = [name for name, value in given.items() if value is not None]
            if named:
                raise ValueError(
                    f"bits_per_element chooses k_key, k_value or value_bits, the coefficients' storage and "
                    f"pack_indices from the dictionary's measured budgets; do not also pass {', '.join(named)}"
                )
            self.budget = best_budget(meta.measured_budgets, bits_per_element)
            chosen = self.budget.cache_arguments()
            k_key, k_value, value_bits = chosen["k_key"], chosen["k_value"], chosen["value_bits"]
            coefficient_dtype, coefficient_bits = chosen["coefficient_dtype"], chosen["coefficient_bits"]
            pack_indices = chosen["pack_indices"]
        k_key = meta.k_key if k_key is None else k_key
        k_value = meta.k_value if k_value is None and value_bits is None else k_value
        pack_indices = False if pack_indices is None else pack_indices
        check_cache_arguments(
            n_atoms=meta.n_atoms,
            num_layers=len(meta.layer_indices),
            k_key=k_key,
            k_value=k_value,
            residual_length=residual_length,
            num_sink_tokens=num_sink_tokens,
            encode_batch=encode_batch,
            coefficient_dtype=coefficient_dtype,
            pack_indices=pack_indices,
            backend=backend,
            value_pursuit=value_pursuit,
            coefficient_bits=coefficient_bits,
            value_bits=value_bits,
        )
        self.dictionary = dictionary
        self.k_key, self.k_value, self.value_bits = _as_given(k_key), _as_given(k_value), value_bits
        layers_of = lambda name, atoms: dict(  # noqa: E731
            zip(meta.layer_indices, per_layer_atoms(name, atoms, len(meta.layer_indices), meta.n_atoms), strict=True)
        )
        layer_atoms = {
            "key": layers_of("k_key", k_key),
            "value": dict.fromkeys(meta.layer_indices) if value_bits is not None else layers_of("k_value", k_value),
        }
        self.residual_length, self.num_sink_tokens = residual_length, num_sink_tokens
        if config is not None:
            layer_types = check_model_fits(dictionary, config)
            text_config = config.get_text_config()
        else:
            layer_types, text_config = ["full_attention"] * meta.num_layers, None
        layers = []
        for i, layer_type in enumerate(layer_types):
            if i in dictionary:
                layers.append(
                    SparseSemanticLayer(
                        dictionary[i],
                        layer_idx=i,
                        k_key=layer_atoms["key"][i],
                        k_value=layer_atoms["value"][i],
                        key_space=meta.key_space,
                        encoder=meta.encoder,
                        rope_scaling=meta.rope_scaling,
                        residual_length=residual_length,
                        num_sink_tokens=num_sink_tokens,
                        encode_batch=encode_batch,
                        coefficient_dtype=coefficient_dtype,
                        coefficient_bits=coefficient_bits,
                        pack_indices=pack_indices,
                        backend=backend,
                        value_pursuit=value_pursuit,
                        value_bits=value_bits,
                        ranks=self.ranks,
                    )
                )
            elif layer_type in SLIDING_LAYER_TYPES:
                window = (
                    text_config.sliding_window
                    if layer_type == "sliding_attention"
                    else text_config.attention_chunk_size
                )
                layers.append(CompactSlidingWindowLayer(sliding_window=window))
            else:
                layers.append(DynamicLayer())
        super().__init__(layers=layers)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        config: PretrainedConfig | None = None,
        model: torch.nn.Module | None = None,
        **kwargs,
    ) -> SparseSemanticCache:
        """Load the dictionary from a folder or Hub repo id and build a cache. Pass ``config=model.config`` (or
        ``model=model``, which also gives a tensor-parallel model's group) to check the dictionary against the model
        now; ``kwargs`` go to ``__init__``."""
        model_config(config, model)  # before loading: a wrong argument fails fast
        dictionary = KVDictionary.from_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
        return cls(dictionary, config=config, model=model, **kwargs)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        meta = self.dictionary.config
        if layer_idx >= len(self.layers):
            raise UnsupportedModelError(
                f"the model has a layer {layer_idx} but the dictionary ({meta.base_model}) covers "
                f"{len(self.layers)} layers: it was made for another model (pass config=model.config to check "
                "before anything runs)"
            )
        layer = self.layers[layer_idx]
        if isinstance(layer, SparseSemanticLayer) and not layer.is_initialized:
            _, heads, _, head_dim = key_states.shape
            rank_heads = distributed.kv_heads_of_rank(meta.num_kv_heads, heads, self.ranks)
            if rank_heads is None or head_dim != meta.head_dim:
                where = f" on rank {self.ranks.rank} of {self.ranks.size}" if self.ranks.size > 1 else ""
                raise UnsupportedModelError(
                    f"layer {layer_idx} of the model has {heads} KV heads and head_dim {head_dim}{where}, the "
                    f"dictionary ({meta.base_model}) was made for {meta.num_kv_heads} KV heads and head_dim "
                    f"{meta.head_dim}: it belongs to another model (pass config=model.config to check before "
                    "anything runs)"
                )
        previous = self.layers[layer_idx - 1] if layer_idx > 0 else None
        if isinstance(previous, SparseSemanticLayer):
            # Layers run in order, so the previous layer's attention is done: with any attention implementation
            # its overflow is encoded now (the "sta" path already did), and a prefill holds at most two layers'
            # dense prompts at a time; the last layer's waits for the next forward or `flush`.
            previous.flush(min_tokens=previous.encode_batch)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        hand_over(layer_idx, self.layers[layer_idx])
        return keys, values

    @property
    def sparse_layers(self) -> list[SparseSemanticLayer]:
        return [layer for layer in self.layers if isinstance(layer, SparseSemanticLayer)]

    def flush(self) -> None:
        """Encode every token that has left its layer's recent window (otherwise done at the next update)."""
        for layer in self.sparse_layers:
            layer.flush()

    def memory_footprint(self, across_ranks: bool = False) -> dict[str, float | int | None]:
        """Bytes the cache really holds after encoding what has left the window, counted from tensor storages
        (each once: a view counts the whole storage it keeps alive).

        Growing with the context: ``code_bytes`` (indices + coefficients + positions of pre-RoPE codes) and
        ``dense_bytes`` (sinks, windows and layers kept dense). Shared: ``dictionary_bytes``, the dictionary tensors
        the layers read (one copy per device, shared by every cache built from the same dictionary; under tensor
        parallelism a rank's share of a per-head dictionary).
        ``dynamic_cache_bytes``: what a DynamicCache of the same dtype holds for the same tokens;
        ``compression_ratio`` = dynamic / (code + dense); ``break_even_tokens``: the context length per row (at
        this batch size) from which codes + dense + dictionaries take fewer bytes than a DynamicCache (None until
        some token is compressed).

        These are this process's bytes (under tensor parallelism, this rank's heads). ``across_ranks=True`` sums
        them over the tensor-parallel group (see the class docstring), a collective that every rank must call.
        """
        self.flush()
        tally = dict.fromkeys(("code", "dense", "dictionary", "dynamic", "compressed_dynamic"), 0.0)
        compressed_tokens = batch = 0
        dictionary_seen: set = set()
        for layer in self.layers:
            if isinstance(layer, SparseSemanticLayer):
                memory = layer.memory()
                tally["code"] += memory["code_bytes"]
                tally["dense"] += memory["dense_bytes"]
                tally["dynamic"] += memory["dynamic_cache_bytes"]
                if layer.is_initialized:
                    tally["dictionary"] += storage_bytes([layer.sae, layer.rope_inv_freq], dictionary_seen)
                    batch, compressed_tokens = layer.keys.shape[0], max(compressed_tokens, layer.num_compressed)
                    tally["compressed_dynamic"] += (
                        memory["dynamic_cache_bytes"] * layer.num_compressed / max(layer.get_seq_length(), 1)
                    )
            elif layer.is_initialized and layer.keys is not None:
                tally["dense"] += storage_bytes([layer.keys, layer.values])
                tally["dynamic"] += 2 * layer.keys.numel() * layer.keys.element_size()
        if tally["dictionary"] == 0:
            tally["dictionary"] = self.dictionary.num_bytes()
        if across_ranks:
            tally = dict(zip(tally, distributed.all_reduce_sum(list(tally.values()), self.ranks), strict=True))
        code, dense, dictionary, dynamic = (int(tally[name]) for name in ("code", "dense", "dictionary", "dynamic"))
        stored = code + dense
        break_even = None
        if compressed_tokens:
            saving_per_token = (tally["compressed_dynamic"] - code) / compressed_tokens  # all rows of the batch
            if saving_per_token > 0:
                fixed = self.num_sink_tokens + self.residual_length
                break_even = fixed + math.ceil(dictionary / saving_per_token)
        return {
            "code_bytes": code,
            "dense_bytes": dense,
            "dictionary_bytes": dictionary,
            "dynamic_cache_bytes": dynamic,
            "compression_ratio": dynamic / stored if stored else float("nan"),
            "break_even_tokens": break_even,
            "batch_size": batch,
        }
