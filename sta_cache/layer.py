"""SparseSemanticLayer: one attention layer's cache, kept as dense sinks + Top-K codes + a dense recent window."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers.cache_utils import CacheLayerMixin

from .configs import Pursuit
from .dictionary import KINDS, LayerDictionary
from .distributed import Ranks, kv_heads_of_rank
from .kernels import dispatch
from .kernels.reference import CompressedKV, apply_rope, decode_reference, undo_rope
from .memory import owned, storage_bytes
from .packing import (
    index_bits,
    level_row_bytes,
    levels_clip,
    pack_indices,
    pack_levels,
    packed_bytes,
    uniform_levels,
    unpack_indices,
    unpack_level_rows,
)
from .rotated_values import RotatedValueCoder
from .validation import check_cache_arguments

T = TypeVar("T")


def index_dtype(n_atoms: int) -> torch.dtype:
    """The smallest integer dtype that holds atom indices ``0 .. n_atoms - 1``."""
    if n_atoms <= 256:
        return torch.uint8
    if n_atoms <= 2**15:
        return torch.int16
    return torch.int32


def atom_code_bytes(
    k: int, n_atoms: int, *, pack_indices: bool, coefficient_dtype: torch.dtype, coefficient_bits: int | None = None
) -> int:
    """Bytes of one key or value vector stored as ``k`` atoms of ``n_atoms``: the indices (packed into
    ceil(log2 N) bits each, or in :func:`index_dtype`) and the coefficients (``coefficient_dtype`` floats, or a row
    of ``coefficient_bits`` levels on a float8 scale)."""
    indices = packed_bytes(k, n_atoms) if pack_indices else k * index_dtype(n_atoms).itemsize
    return indices + (level_row_bytes(k, coefficient_bits) if coefficient_bits else k * coefficient_dtype.itemsize)


class SparseSemanticLayer(CacheLayerMixin):
    """The cache of one attention layer.

    Slots are ordered ``sinks | compressed | window``:

    * ``sinks``: the first ``num_sink_tokens`` real tokens of every row, dense. With left padding a row's pads sit
      before its first real token, so the sink region extends until every row has its sinks; a row with fewer
      pads keeps a few more dense tokens there.
    * ``compressed``: ``k_key`` atom indices + coefficients per key and ``k_value`` per value, per KV head; or,
      with ``value_bits``, each value rotated and scalar-quantized (:mod:`.rotated_values`).
    * ``window``: the most recent ``residual_length`` tokens, dense, plus the tokens the current step appended.

    A token is encoded once, after it has left the window, at a later ``update`` (so the step that wrote it
    attends to it exactly); tokens are encoded ``encode_batch`` at a time, which amortises the encoder's per-call
    cost over decode steps (the window then holds up to ``residual_length + encode_batch - 1`` dense tokens).
    Keys are coded post-RoPE, or pre-RoPE when the dictionary says so: then each key is
    un-rotated by the position the model gave it and re-rotated when used. The positions come from the "sta"
    attention function (which sees the model's ``position_ids``); other attention implementations do not
    report them and slot ``i`` is taken to be position ``i`` (exact without left padding).

    Under tensor parallelism the key states hold only this rank's KV heads: ``ranks`` is the tensor-parallel group,
    from which the layer tells which heads those are and codes them with the matching per-head SAEs (a dictionary
    shared by all heads needs no choice). The layer's codes and dictionary copies live on the device of its key
    states, so the layers of a model spread over devices each keep theirs on their own.
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        dictionary: LayerDictionary,
        *,
        layer_idx: int,
        k_key: int,
        k_value: int | None,
        key_space: str,
        encoder: str,
        rope_scaling: float,
        residual_length: int,
        num_sink_tokens: int,
        encode_batch: int = 1,
        coefficient_dtype: torch.dtype | None = None,
        coefficient_bits: int | None = None,
        pack_indices: bool = False,
        backend: str = "auto",
        value_pursuit: Pursuit = "mp",
        value_bits: int | None = None,
        ranks: Ranks | None = None,
    ):
        super().__init__()
        n_atoms = dictionary.key[0].n_atoms
        check_cache_arguments(
            n_atoms=n_atoms,
            k_key=k_key,
            k_value=k_value,
            residual_length=residual_length,
            num_sink_tokens=num_sink_tokens,
            encode_batch=encode_batch,
            coefficient_dtype=coefficient_dtype,
            coefficient_bits=coefficient_bits,
            pack_indices=pack_indices,
            backend=backend,
            value_pursuit=value_pursuit,
            value_bits=value_bits,
        )
        self.dictionary = dictionary
        self.layer_idx = layer_idx
        self.value_bits = value_bits  # values rotated and scalar-quantized at these bits (rotated_values.py)
        self.k = {"key": k_key, "value": k_value if value_bits is None else dictionary.key[0].d}
        self.key_space, self.encoder, self.rope_scaling = key_space, encoder, rope_scaling
        self.residual_length, self.num_sink_tokens = residual_length, num_sink_tokens
        self.encode_batch = encode_batch
        self.pursuit = {"key": "omp", "value": value_pursuit}
        self.n_atoms, self.head_dim = n_atoms, dictionary.key[0].d
        self.num_dictionary_heads = len(dictionary.key)
        self.ranks = ranks or Ranks()
        self.requested_coefficient_dtype = coefficient_dtype
        self.coefficient_bits = coefficient_bits  # coefficients as levels on a float8 scale per vector (packing.py)
        self.pack_indices = pack_indices
        self.requested_backend = backend
        self.attention_reads_codes = False  # set by the "sta" attention function
        self.warned_clamping = False
        self._clear()

    # ------------------------------------------------------------------------------------------ state
    def _clear(self) -> None:
        self.keys = self.values = None  # the window, as transformers' layers call their dense tensors
        self.is_initialized = False
        self.sink_keys = self.sink_values = None
        self.sink_positions = self.sink_real = None
        self.window_positions = self.window_real = None
        self.codes: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {"key": None, "value": None}
        self.key_positions = None
        self.sinks_settled = False
        self.kv_heads: range | None = None  # the model's KV heads of the per-head SAEs in use; None: shared

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        if head_dim != self.head_dim:
            raise ValueError(
                f"layer {self.layer_idx}: the model's head_dim is {head_dim} but the dictionary was made for "
                f"head_dim {self.head_dim}"
            )
        kv_heads = None  # a shared dictionary codes every head
        if self.num_dictionary_heads > 1:
            kv_heads = kv_heads_of_rank(self.num_dictionary_heads, heads, self.ranks)
            if kv_heads is None:
                raise ValueError(
                    f"layer {self.layer_idx}: the model has {heads} KV heads but the dictionary holds per-head SAEs "
                    f"for {self.num_dictionary_heads}, and no split of those over {self.ranks.size} tensor-parallel "
                    f"rank(s) leaves a rank {heads}"
                )
        device = key_states.device
        backend = dispatch.resolve_backend(self.requested_backend, device, head_dim)  # may raise: before any state
        used = ("W_dec", "b_dec") if self.encoder == "omp" else ("W_enc", "b_enc", "W_dec", "b_dec")
        sae = {kind: self.dictionary.on_device(kind, device, used, kv_heads) for kind in KINDS}
        self.value_coder = None
        if self.value_bits:  # the value "atoms" are the coder's rotation, slot j atom j; the bias centres them
            self.value_coder = RotatedValueCoder(head_dim, self.value_bits, self.layer_idx, device)
            bias = self.dictionary.on_device("value", device, ("b_dec",), kv_heads)["b_dec"]
            rotation = self.value_coder.rotation.expand(bias.shape[0], head_dim, head_dim).contiguous()
            sae["value"] = {"W_dec": rotation, "b_dec": bias, "levels": self.value_coder.codebook}
        rope_inv_freq = self.dictionary.rope_inv_freq.to(device)
        self.sae, self.rope_inv_freq, self.backend = sae, rope_inv_freq, backend
        self.kv_heads = kv_heads
        self.dtype, self.device = key_states.dtype, device
        self.coefficient_dtype = (
            torch.uint8 if self.coefficient_bits else self.requested_coefficient_dtype or key_states.dtype
        )
        self._warn_if_codes_outweigh(dense_bytes=2 * head_dim * key_states.element_size())
        empty = key_states.new_empty(batch, heads, 0, head_dim)  # not a view: it would hold the prompt's storage
        self.keys, self.values = empty, empty
        self.sink_keys, self.sink_values = empty, empty
        self.sink_positions = torch.zeros(batch, 0, dtype=torch.long, device=self.device)
        self.sink_real = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self.window_positions, self.window_real = self.sink_positions, self.sink_real
        for kind in KINDS:
            self.codes[kind] = (
                torch.zeros(batch, heads, 0, self.index_width(kind), dtype=self.stored_index_dtype, device=device),
                torch.zeros(
                    batch, heads, 0, self.coefficient_width(kind), dtype=self.stored_dtype(kind), device=device
                ),
            )
        if self.key_space == "pre_rope":
            self.key_positions = torch.zeros(batch, 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def code_bytes_per_token(self) -> int:
        """Bytes one token's key and value codes take per KV head: indices, coefficients, and the position that
        pre-RoPE keys keep."""
        total = 4 if self.key_space == "pre_rope" else 0
        for kind in KINDS:
            if self.rotated(kind):
                total += self.coefficient_width(kind)  # one uint8 row: the gain byte and the packed codes
            else:
                total += atom_code_bytes(
                    self.k[kind],
                    self.n_atoms,
                    pack_indices=self.pack_indices,
                    coefficient_dtype=self.coefficient_dtype,
                    coefficient_bits=self.coefficient_bits,
                )
        return total

    def rotated(self, kind: str) -> bool:
        """Whether ``kind``'s vectors are stored by the rotated value coder rather than as atoms."""
        return kind == "value" and self.value_bits is not None

    def index_width(self, kind: str) -> int:
        """Last dim of one kind's stored indices: k, its packed bytes, or 0 (rotated values: slot j is atom j)."""
        if self.rotated(kind):
            return 0
        return packed_bytes(self.k[kind], self.n_atoms) if self.pack_indices else self.k[kind]

    def coefficient_width(self, kind: str) -> int:
        """Last dim of one kind's stored coefficients: k, or the bytes of a row of k levels (head_dim of them for
        rotated values)."""
        if self.rotated(kind):
            return level_row_bytes(self.head_dim, self.value_bits)
        return level_row_bytes(self.k[kind], self.coefficient_bits) if self.coefficient_bits else self.k[kind]

    def stored_dtype(self, kind: str) -> torch.dtype:
        """The dtype of one kind's stored coefficients (uint8 for rows of levels)."""
        return torch.uint8 if self.rotated(kind) else self.coefficient_dtype

    def level_values(self, kind: str) -> torch.Tensor | None:
        """What each level code of ``kind``'s coefficients stands for, when they are stored as levels."""
        if self.rotated(kind):
            return self.value_coder.codebook
        return uniform_levels(self.coefficient_bits).to(self.device) if self.coefficient_bits else None

    @property
    def coefficient_storage(self) -> str:
        """How coefficients are stored, in words: a dtype's name, or "4-bit levels" and the like."""
        if self.coefficient_bits:
            return f"{self.coefficient_bits}-bit levels"
        return str(self.coefficient_dtype).removeprefix("torch.")

    @property
    def value_storage(self) -> str:
        """How values are coded, in words: "k_value=16" or "values rotated at 3 bits"."""
        return f"values rotated at {self.value_bits} bits" if self.value_bits else f"k_value={self.k['value']}"

    def _warn_if_codes_outweigh(self, dense_bytes: int) -> None:
        code_bytes = self.code_bytes_per_token()
        if code_bytes >= dense_bytes:
            warnings.warn(
                f"SparseSemanticCache with k_key={self.k['key']}, {self.value_storage} and "
                f"{self.coefficient_storage} coefficients stores {code_bytes} bytes per "
                f"token and KV head, the dense key and value it replaces take {dense_bytes}: this cache is larger "
                "than a DynamicCache. Lower k_key / k_value, or store coefficient_dtype=torch.float8_e4m3fn with "
                "pack_indices=True.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def stored_index_dtype(self) -> torch.dtype:
        return torch.uint8 if self.pack_indices else index_dtype(self.n_atoms)

    @property
    def num_sinks(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[2]

    @property
    def num_compressed(self) -> int:
        return 0 if self.codes["key"] is None else self.codes["key"][0].shape[2]

    @property
    def num_window(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _atomically(self, step: Callable[[SparseSemanticLayer], T]) -> T:
        """Run ``step`` on a draft of this layer (a shallow copy) and take the draft's state over only once it has
        returned. Steps replace tensors and never write into the ones held, so an exception anywhere (NaN states,
        a failing kernel, a bad beam index) leaves the layer exactly as it was: never key codes without their
        value codes, or lengths that disagree."""
        draft = object.__new__(type(self))
        draft.__dict__.update(self.__dict__)
        draft.codes = dict(self.codes)  # the one container that steps change in place
        result = step(draft)
        self.__dict__.update(draft.__dict__)
        return result

    # ------------------------------------------------------------------------------------ the protocol
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode what has left the window, append the new tokens densely, and return the keys and values that
        attention should see: all of them (codes rebuilt) for dense attention implementations, or only the
        window when the "sta" attention function reads the codes itself. All or nothing: if anything raises,
        the layer is left as it was before the call."""
        return self._atomically(lambda layer: layer._update(key_states, value_states))

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush(self.encode_batch)
        start, new = self.get_seq_length(), key_states.shape[2]
        if self.num_window == 0:  # no copy of a whole prompt, unless it is a view of something larger
            self.keys, self.values = owned(key_states), owned(value_states)
        else:
            self.keys = torch.cat([self.keys, key_states], dim=2)
            self.values = torch.cat([self.values, value_states], dim=2)
        default_positions = torch.arange(start, start + new, device=self.device).expand(key_states.shape[0], -1)
        self.window_positions = torch.cat([self.window_positions, default_positions], dim=1)
        self.window_real = torch.cat([self.window_real, torch.ones_like(default_positions, dtype=torch.bool)], dim=1)
        if self.attention_reads_codes:
            return self.keys, self.values
        return self.dense_keys_values()

    def observe(self, position_ids: torch.Tensor | None, real: torch.Tensor | None) -> None:
        """Record the rotary positions ``[B or 1, q]`` and real-token flags ``[B, q]`` of the ``q`` tokens that the
        last ``update`` appended (called by the "sta" attention function, which sees them). All or nothing."""
        new = position_ids.shape[-1] if position_ids is not None else (real.shape[-1] if real is not None else 0)
        if new == 0:
            return
        if new > self.num_window:
            raise ValueError(f"layer {self.layer_idx}: {new} new tokens observed but the window holds fewer")
        self._atomically(lambda layer: layer._observe(new, position_ids, real))

    def _observe(self, new: int, position_ids: torch.Tensor | None, real: torch.Tensor | None) -> None:
        if position_ids is not None:
            positions = position_ids.to(self.device).expand(self.window_positions.shape[0], -1)
            self.window_positions = torch.cat([self.window_positions[:, :-new], positions], dim=1)
        if real is not None:
            self.window_real = torch.cat([self.window_real[:, :-new], real.to(self.device)], dim=1)

    def flush(self, min_tokens: int = 1) -> None:
        """Settle the sinks once every row has them, then encode every token beyond the recent window, if there
        are at least ``min_tokens`` of them. All or nothing: if encoding raises, nothing is stored."""
        if not self.is_initialized or (self.sinks_settled and self.num_window - self.residual_length < min_tokens):
            return  # nothing to do, the case of most decode steps: no draft
        self._atomically(lambda layer: layer._flush(min_tokens))

    def _flush(self, min_tokens: int) -> None:
        if not self.sinks_settled:
            self._settle_sinks()
            if not self.sinks_settled:
                return
        overflow = self.num_window - self.residual_length
        if overflow <= 0 or overflow < min_tokens:
            return
        keys, values = self.keys[:, :, :overflow], self.values[:, :, :overflow]
        positions = self.window_positions[:, :overflow]
        if self.key_space == "pre_rope":
            keys = undo_rope(keys, positions, self.rope_inv_freq, self.rope_scaling)
            self.key_positions = torch.cat([self.key_positions, positions.to(torch.int32)], dim=1)
        for kind, states in (("key", keys), ("value", values)):
            indices, coefficients = self._encode(kind, states)
            old_indices, old_coefficients = self.codes[kind]
            self.codes[kind] = (
                torch.cat([old_indices, indices], dim=2),
                torch.cat([old_coefficients, coefficients], dim=2),
            )
        self.keys, self.values = owned(self.keys[:, :, overflow:]), owned(self.values[:, :, overflow:])
        self.window_positions = owned(self.window_positions[:, overflow:])
        self.window_real = owned(self.window_real[:, overflow:])

    def _settle_sinks(self) -> None:
        """Move the window's first slots into the sink region once every row has ``num_sink_tokens`` real tokens
        there (and the window overflows, so the choice matters)."""
        if self.num_window <= self.residual_length:
            return
        needed = 0
        if self.num_sink_tokens:
            seen = self.window_real.cumsum(dim=1)
            reached = seen >= self.num_sink_tokens
            if not bool(reached[:, -1].all()):
                return
            needed = int(reached.int().argmax(dim=1).max()) + 1
        # The window is cut again (and compacted) by the flush that follows; the sinks are kept for good.
        self.sink_keys, self.keys = owned(self.keys[:, :, :needed]), self.keys[:, :, needed:]
        self.sink_values, self.values = owned(self.values[:, :, :needed]), self.values[:, :, needed:]
        self.sink_positions = owned(self.window_positions[:, :needed])
        self.window_positions = self.window_positions[:, needed:]
        self.sink_real, self.window_real = owned(self.window_real[:, :needed]), self.window_real[:, needed:]
        self.sinks_settled = True

    def _encode(self, kind: str, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code ``states [B, H, n, d]`` with this layer's ``kind`` SAE(s) -> indices, coefficients ``[B, H, n, k]``
        as stored (bit-packed indices and rows of coefficient levels have their own last dim)."""
        if states.numel() and not torch.isfinite(states.abs().amax()):  # NaN and inf reach the maximum: 6x faster
            raise ValueError(
                f"layer {self.layer_idx}: non-finite {kind} states reached the encoder (NaN or inf in the model's "
                "activations); refusing to store codes for them"
            )
        batch, heads, n, d = states.shape
        k, sae, pursuit = self.k[kind], self.sae[kind], self.pursuit[kind]
        if self.rotated(kind):
            rows, clamped = self.value_coder.encode(states.float() - sae["b_dec"].view(1, -1, 1, d), self.backend)
            if clamped and not self.warned_clamping:
                self._warn_clamping("the float8 gain of rotated values (448)")
            return states.new_empty(batch, heads, n, 0, dtype=self.stored_index_dtype), rows
        if self.num_dictionary_heads == 1:
            one = {name: t[0] for name, t in sae.items()}
            indices, coefficients = dispatch.encode(
                states.reshape(-1, d).float(), one, k, self.encoder, self.backend, pursuit
            )
            indices, coefficients = indices.view(batch, heads, n, k), coefficients.view(batch, heads, n, k)
        else:
            per_head = [
                dispatch.encode(
                    states[:, h].reshape(-1, d).float(),
                    {name: t[h] for name, t in sae.items()},
                    k,
                    self.encoder,
                    self.backend,
                    pursuit,
                )
                for h in range(heads)
            ]
            indices = torch.stack([i.view(batch, n, k) for i, _ in per_head], dim=1)
            coefficients = torch.stack([c.view(batch, n, k) for _, c in per_head], dim=1)
        if self.coefficient_bits:
            if not self.warned_clamping and levels_clip(coefficients, self.coefficient_bits):
                self._warn_clamping(f"{self.coefficient_bits}-bit levels on a float8 scale")
            coefficients = pack_levels(coefficients, self.coefficient_bits)
        elif self.coefficient_dtype.itemsize < 4:
            coefficients = self._clamp_to_coefficient_dtype(coefficients).to(self.coefficient_dtype)
        else:
            coefficients = coefficients.to(self.coefficient_dtype)
        if self.pack_indices:
            return pack_indices(indices, self.n_atoms), coefficients
        return indices.to(self.stored_index_dtype), coefficients

    def _clamp_to_coefficient_dtype(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Clamp float32 coefficients to the range of a narrower coefficient dtype, which a cast would turn into
        inf (float16, bfloat16) or NaN (float8); warn the first time this layer clamps, as its codes then lose
        accuracy."""
        limit = torch.finfo(self.coefficient_dtype).max
        if not self.warned_clamping and bool((coefficients.abs() > limit).any()):
            self._warn_clamping(f"{self.coefficient_dtype} (|c| > {limit:g})")
        return coefficients.clamp(-limit, limit)

    def _warn_clamping(self, storage: str) -> None:
        warnings.warn(
            f"layer {self.layer_idx}: coefficients beyond the range of {storage} were clamped to it; these tokens "
            "are coded less accurately. Store a wider coefficient_dtype (e.g. torch.float32, or None for the "
            "model's dtype) if this happens often.",
            RuntimeWarning,
            stacklevel=3,
        )
        self.warned_clamping = True

    def _indices(self, kind: str) -> torch.Tensor:
        stored = self.codes[kind][0]
        if self.rotated(kind):
            return torch.arange(self.head_dim, device=self.device).expand(*stored.shape[:3], -1)
        return unpack_indices(stored, self.k[kind], self.n_atoms) if self.pack_indices else stored

    def _coefficients(self, kind: str) -> torch.Tensor:
        stored, levels = self.codes[kind][1], self.level_values(kind)
        return stored if levels is None else unpack_level_rows(stored, self.k[kind], levels)

    def compressed_view(self, packed: bool = False) -> CompressedKV:
        """The layer as decode-into-attention reads it; ``packed=True`` leaves bit-packed indices and coefficient
        levels packed (for the fused CPU kernels, which unpack them as they stream)."""
        keep_packed = packed and self.pack_indices
        levels = {kind: self.level_values(kind) if packed else None for kind in KINDS}
        stored = {kind: (packed and self.rotated(kind)) or keep_packed for kind in KINDS}
        return CompressedKV(
            sink_keys=self.sink_keys,
            sink_values=self.sink_values,
            key_indices=self.codes["key"][0] if stored["key"] else self._indices("key"),
            key_coefficients=self._coefficients("key") if levels["key"] is None else self.codes["key"][1],
            value_indices=self.codes["value"][0] if stored["value"] else self._indices("value"),
            value_coefficients=self._coefficients("value") if levels["value"] is None else self.codes["value"][1],
            window_keys=self.keys,
            window_values=self.values,
            key_atoms=self.sae["key"]["W_dec"],
            key_bias=self.sae["key"]["b_dec"],
            value_atoms=self.sae["value"]["W_dec"],
            value_bias=self.sae["value"]["b_dec"],
            key_positions=self.key_positions if self.key_space == "pre_rope" else None,
            rope_inv_freq=self.rope_inv_freq if self.key_space == "pre_rope" else None,
            rope_scaling=self.rope_scaling,
            packed_index_bits=index_bits(self.n_atoms) if keep_packed else 0,
            key_levels=levels["key"],
            value_levels=levels["value"],
            k_key=self.k["key"],
            k_value=self.k["value"],
        )

    def dense_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values, with the compressed tokens rebuilt (and re-rotated for pre-RoPE codes)."""
        if self.num_compressed == 0:
            if self.num_sinks == 0:
                return self.keys, self.values
            return torch.cat([self.sink_keys, self.keys], dim=2), torch.cat([self.sink_values, self.values], dim=2)
        view = self.compressed_view()
        keys = decode_reference(view.key_indices, view.key_coefficients, view.key_atoms, view.key_bias)
        if view.key_positions is not None:
            keys = apply_rope(keys, view.key_positions, view.rope_inv_freq, view.rope_scaling)
        values = decode_reference(view.value_indices, view.value_coefficients, view.value_atoms, view.value_bias)
        return (
            torch.cat([self.sink_keys, keys.to(self.dtype), self.keys], dim=2),
            torch.cat([self.sink_values, values.to(self.dtype), self.values], dim=2),
        )

    def get_seq_length(self) -> int:
        return self.num_sinks + self.num_compressed + self.num_window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def _map_batch(self, fn) -> None:
        """Apply ``fn`` to the batch dimension of every stored tensor (beam search and batch edits), all or
        nothing."""
        if self.is_initialized:
            self._atomically(lambda layer: layer._map_batch_tensors(fn))

    def _map_batch_tensors(self, fn) -> None:
        for name in (
            "keys",
            "values",
            "sink_keys",
            "sink_values",
            "sink_positions",
            "sink_real",
            "window_positions",
            "window_real",
            "key_positions",
        ):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, fn(tensor))
        for kind in KINDS:
            self.codes[kind] = tuple(fn(t) for t in self.codes[kind])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens; a negative value drops the last ``-max_length`` (as transformers'
        layers do). Tokens still in the window go exactly; deeper crops drop codes (the kept tokens are not
        re-encoded), and a crop into the sinks returns them to the window. All or nothing."""
        self._atomically(lambda layer: layer._crop(max_length))

    def _crop(self, max_length: int) -> None:
        length = self.get_seq_length()
        keep_total = length + max_length if max_length < 0 else max_length
        remove = length - max(keep_total, 0)
        if remove <= 0 or not self.is_initialized:
            return
        from_window = min(remove, self.num_window)
        keep = self.num_window - from_window
        self.keys, self.values = owned(self.keys[:, :, :keep]), owned(self.values[:, :, :keep])
        self.window_positions = owned(self.window_positions[:, :keep])
        self.window_real = owned(self.window_real[:, :keep])
        remove -= from_window
        from_codes = min(remove, self.num_compressed)
        if from_codes:
            keep = self.num_compressed - from_codes
            for kind in KINDS:
                self.codes[kind] = tuple(owned(t[:, :, :keep]) for t in self.codes[kind])
            if self.key_positions is not None:
                self.key_positions = owned(self.key_positions[:, :keep])
        remove -= from_codes
        if remove:
            keep = self.num_sinks - remove
            self.keys, self.values = owned(self.sink_keys[:, :, :keep]), owned(self.sink_values[:, :, :keep])
            self.window_positions = owned(self.sink_positions[:, :keep])
            self.window_real = owned(self.sink_real[:, :keep])
            self.sink_keys, self.sink_values = owned(self.sink_keys[:, :, :0]), owned(self.sink_values[:, :, :0])
            self.sink_positions, self.sink_real = owned(self.sink_positions[:, :0]), owned(self.sink_real[:, :0])
            self.sinks_settled = False

    # ---------------------------------------------------------------------------------------- accounting
    def dense_tensors(self) -> list[torch.Tensor | None]:
        """The sinks and the window with their position / padding bookkeeping."""
        return [
            self.sink_keys,
            self.sink_values,
            self.keys,
            self.values,
            self.sink_positions,
            self.sink_real,
            self.window_positions,
            self.window_real,
        ]

    def code_tensors(self) -> list[torch.Tensor | None]:
        """Indices and coefficients of both kinds, and the positions of pre-RoPE codes."""
        return [*self.codes["key"], *self.codes["value"], self.key_positions]

    def memory(self) -> dict[str, int]:
        """Bytes held, counted from storages (each once): ``code_bytes`` (:meth:`code_tensors`), ``dense_bytes``
        (:meth:`dense_tensors`), and ``dynamic_cache_bytes``: what a DynamicCache of the same dtype would hold for
        these tokens. The dictionaries are shared by every cache built from them and counted by the cache."""
        if not self.is_initialized:
            return {"code_bytes": 0, "dense_bytes": 0, "dynamic_cache_bytes": 0}
        seen = set()
        code = storage_bytes(self.code_tensors(), seen)
        dense = storage_bytes(self.dense_tensors(), seen)
        batch, heads, _, d = self.keys.shape
        dynamic = 2 * batch * heads * self.get_seq_length() * d * self.keys.element_size()
        return {"code_bytes": code, "dense_bytes": dense, "dynamic_cache_bytes": dynamic}
