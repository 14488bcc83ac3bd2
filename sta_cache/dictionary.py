"""KVDictionary: the per-layer key and value SAEs of one model, saved as safetensors + config.json + model card."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .budgets import MeasuredBudget
from .configs import Encoder, KeySpace, check_choice
from .memory import storage_bytes
from .sae import TopKSAE
from .validation import check_flag, check_int, check_positive_float, per_layer_atoms

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "dictionary.safetensors"
if TYPE_CHECKING:
    from .allocation import LayerSensitivity

KINDS = ("key", "value")
SAE_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# config.json records the sha256 of the tensors under this key (not a config field: it describes the file).
DIGEST_KEY = "tensor_sha256"
# Decoder atoms are unit vectors; a file saved in a narrow dtype keeps them unit only to that dtype's precision.
ATOM_NORM_TOLERANCE = 1e-2


class DictionaryFormatError(ValueError):
    """A dictionary folder that is missing, truncated, corrupted or inconsistent with its config."""


@dataclass
class KVDictionaryConfig:
    """What a dictionary was made for and how its codes are chosen.

    ``layer_indices`` are the model layers that have SAEs (e.g. only Gemma-3's full-attention layers); the
    other layers of a ``num_layers``-layer model keep a dense cache. ``key_space`` is ``"post_rope"`` (keys as the
    model caches them, as in the paper) or ``"pre_rope"`` (un-rotated by their position before coding; the
    rotary frequencies of each layer are stored with the weights). ``encoder`` is ``"topk"`` (the SAE's one-shot
    encoder) or ``"omp"`` (orthogonal matching pursuit over the decoder).
    """

    base_model: str
    num_layers: int
    layer_indices: list[int]
    num_kv_heads: int
    head_dim: int
    n_atoms: int
    per_head: bool = False
    k_key: int = 8
    k_value: int = 16
    key_space: KeySpace = "post_rope"
    encoder: Encoder = "topk"
    rope_scaling: float = 1.0
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    measured: list[dict] = field(default_factory=list)  # MeasuredBudget fields: what bits_per_element chooses from
    sensitivity: dict = field(default_factory=dict)  # LayerSensitivity fields: what per-layer budgets are chosen by
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        """Check every field's type and range: a config.json edited by hand (``"n_atoms": 1024.0``, ``"rope_scaling":
        "1.0"``) is refused here by name rather than failing somewhere inside torch."""
        try:
            self._check_fields()
        except (TypeError, ValueError) as error:
            raise DictionaryFormatError(f"invalid dictionary config: {error}") from error

    def _check_fields(self) -> None:
        if not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a string, got {self.base_model!r}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "n_atoms", "format_version"):
            check_int(name, getattr(self, name), minimum=1)
        if not isinstance(self.layer_indices, list):
            raise TypeError(f"layer_indices must be a list of ints, got {self.layer_indices!r}")
        for i in self.layer_indices:
            check_int(
                "each of layer_indices",
                i,
                maximum=self.num_layers - 1,
                minimum=0,
                bound=f" (a layer of the {self.num_layers}-layer model)",
            )
        if len(set(self.layer_indices)) != len(self.layer_indices):
            raise ValueError(f"layer_indices {self.layer_indices} name a layer twice")
        for name in ("k_key", "k_value"):
            check_int(f"default {name}", getattr(self, name), minimum=1, maximum=self.n_atoms, bound=" (n_atoms)")
        check_flag("per_head", self.per_head)
        check_choice("key_space", self.key_space, KeySpace)
        check_choice("encoder", self.encoder, Encoder)
        check_positive_float("rope_scaling", self.rope_scaling)
        if self.key_space == "pre_rope" and self.head_dim % 2:
            raise ValueError(f"pre-RoPE keys rotate pairs of dimensions: head_dim must be even, got {self.head_dim}")
        for name in ("training", "evaluation"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a JSON object (a dict), got {getattr(self, name)!r}")
        if not isinstance(self.measured, list) or not all(isinstance(row, dict) for row in self.measured):
            raise TypeError(f"measured must be a list of JSON objects, got {self.measured!r}")
        for budget in self.measured_budgets:
            per_layer_atoms("a measured budget's k_key", budget.k_key, len(self.layer_indices), self.n_atoms)
            if budget.value_bits is None:
                per_layer_atoms("a measured budget's k_value", budget.k_value, len(self.layer_indices), self.n_atoms)

        sensitivity = self.layer_sensitivity
        if sensitivity is not None and sensitivity.num_layers != len(self.layer_indices):
            raise ValueError(
                f"sensitivity has {sensitivity.num_layers} layers, the dictionary {len(self.layer_indices)}"
            )

    @property
    def layer_sensitivity(self) -> LayerSensitivity | None:
        """How much each layer and kind loses with few atoms (:mod:`sta_cache.allocation`), if it was measured."""
        from .allocation import LayerSensitivity  # allocation reads dictionaries

        if not self.sensitivity:
            return None
        if not isinstance(self.sensitivity, dict):
            raise TypeError(f"sensitivity must be a JSON object (a dict), got {self.sensitivity!r}")
        try:
            return LayerSensitivity(**self.sensitivity)
        except TypeError as error:  # a missing or unknown field
            raise TypeError(f"sensitivity has the wrong fields: {error}") from None

    @property
    def measured_budgets(self) -> list[MeasuredBudget]:
        """The storage settings this dictionary was measured at (``sta-cache eval --record-budgets``)."""
        try:
            return [MeasuredBudget(**row) for row in self.measured]
        except TypeError as error:  # a missing or unknown field
            raise TypeError(f"a measured budget has the wrong fields: {error}") from None

    @property
    def num_dictionary_heads(self) -> int:
        return self.num_kv_heads if self.per_head else 1

    @classmethod
    def from_dict(cls, data: dict) -> KVDictionaryConfig:
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise DictionaryFormatError(f"config.json lacks the fields {missing}")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise DictionaryFormatError(
                f"dictionary format {version} is newer than this sta_cache understands ({FORMAT_VERSION}); upgrade"
            )
        return cls(**{k: v for k, v in data.items() if k in known})


class LayerDictionary(nn.Module):
    """The key SAEs and value SAEs of one attention layer (one of each, or one per KV head), plus that layer's
    rotary frequencies when keys are coded before RoPE."""

    def __init__(self, config: KVDictionaryConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        heads = config.num_dictionary_heads
        make = lambda: TopKSAE(config.head_dim, config.n_atoms, encoder=config.encoder, dtype=dtype)  # noqa: E731
        self.key = nn.ModuleList(make() for _ in range(heads))
        self.value = nn.ModuleList(make() for _ in range(heads))
        self.register_buffer("rope_inv_freq", torch.zeros(config.head_dim // 2, dtype=torch.float32))
        self._device_copies: dict[tuple, dict[str, torch.Tensor]] = {}

    def saes(self, kind: str) -> nn.ModuleList:
        return self.key if kind == "key" else self.value

    def on_device(
        self, kind: str, device: torch.device, names: tuple[str, ...], heads: range | None = None
    ) -> dict[str, torch.Tensor]:
        """The ``names`` SAE tensors of ``kind`` stacked over dictionary heads (``W_dec [Hd, N, d]``, ``b_dec
        [Hd, d]``, ``W_enc [Hd, d, N]``, ``b_enc [Hd, N]``) in float32 on ``device``, made once and shared by every
        cache that uses this dictionary there (ten caches on one device hold one copy). ``heads`` picks the per-head
        SAEs of the KV heads a tensor-parallel rank holds (all by default); the copy holds those alone. A float32
        dictionary shared by all KV heads is not copied at all on its own device: these are views of its weights.
        Changing the weights in place makes a fresh copy on the next call."""
        shared = len(self.saes(kind)) == 1
        picked = (0,) if shared else tuple(range(len(self.saes(kind))) if heads is None else heads)
        saes = [self.saes(kind)[h] for h in picked]
        weights = [getattr(sae, name) for sae in saes for name in names]
        key = (kind, str(device), names, picked, tuple((w.data_ptr(), w._version) for w in weights))
        if key not in self._device_copies:
            self._device_copies = {k: v for k, v in self._device_copies.items() if k[:4] != key[:4]}
            self._device_copies[key] = {
                name: torch.stack([getattr(sae, name).detach() for sae in saes]).to(device, torch.float32)
                if not shared
                else getattr(saes[0], name).detach().unsqueeze(0).to(device, torch.float32)
                for name in names
            }
        return self._device_copies[key]


class KVDictionary(nn.Module):
    """The SAEs for one model: for each compressed attention layer a key SAE and a value SAE."""

    def __init__(self, config: KVDictionaryConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleDict({str(i): LayerDictionary(config, dtype) for i in config.layer_indices})

    def __getitem__(self, layer_idx: int) -> LayerDictionary:
        return self.layers[str(layer_idx)]

    def __contains__(self, layer_idx: int) -> bool:
        return str(layer_idx) in self.layers

    def num_bytes(self) -> int:
        """Bytes of every tensor storage that the dictionaries hold (each once)."""
        return storage_bytes(list(self.parameters()) + list(self.buffers()))

    # ----------------------------------------------------------------------------------------------- saving
    def _flat_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors on disk. Matching-pursuit dictionaries never use an encoder, so they hold and store only
        the decoder (half the bytes)."""
        tensors = {}
        params = ("W_dec", "b_dec") if self.config.encoder == "omp" else SAE_PARAMS
        for i in self.config.layer_indices:
            layer = self[i]
            for kind in KINDS:
                for h, sae in enumerate(layer.saes(kind)):
                    for name in params:
                        tensors[f"layers.{i}.{kind}.{h}.{name}"] = getattr(sae, name).detach().contiguous()
            if self.config.key_space == "pre_rope":
                tensors[f"layers.{i}.rope_inv_freq"] = layer.rope_inv_freq.contiguous()
        return tensors

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write ``dictionary.safetensors``, ``config.json`` and a ``README.md`` model card (never pickle).
        ``dtype`` (e.g. ``torch.float16``) casts the SAE weights on disk; rotary frequencies stay float32."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: (t.to(dtype) if dtype is not None and "rope" not in name else t).cpu()
            for name, t in self._flat_tensors().items()
        }
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "sta_cache": str(FORMAT_VERSION)})
        config = {**asdict(self.config), DIGEST_KEY: tensor_digest(tensors)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (directory / "README.md").write_text(model_card(self.config, directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVDictionary:
        """Load from a local folder or a Hub repo id (resolved through huggingface_hub and its cache)."""
        from .hub import resolve_dictionary

        directory = resolve_dictionary(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
        return cls.load_folder(directory, dtype=dtype)

    @classmethod
    def load_folder(cls, directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> KVDictionary:
        """Read a saved folder, checking once what every later step relies on: the config's fields, that config
        and tensors agree exactly, the recorded sha256 of the tensors (when config.json has one), and the
        tensors' contents (see :func:`check_tensor`)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise DictionaryFormatError(f"{directory} is not a sta_cache dictionary: {path.name} is missing")
        try:
            data = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise DictionaryFormatError(f"{config_path} is not valid dictionary JSON: {error}") from error
        if not isinstance(data, dict):
            raise DictionaryFormatError(f"{config_path} is not valid dictionary JSON: it holds no object")
        try:
            config = KVDictionaryConfig.from_dict(data)
        except DictionaryFormatError as error:
            raise DictionaryFormatError(f"{config_path}: {error}") from error
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise DictionaryFormatError(
                f"{weights_path} is truncated or corrupted and cannot be read ({error}); download it again"
            ) from error
        dictionary = cls(config, dtype=dtype)
        expected = dictionary._flat_tensors()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            missing_layers = sorted({int(name.split(".")[1]) for name in missing})
            raise DictionaryFormatError(
                f"{weights_path} does not match its config.json: missing {len(missing)} tensors"
                f" (layers {missing_layers}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        recorded = data.get(DIGEST_KEY)
        if recorded is not None and recorded != tensor_digest(tensors):
            raise DictionaryFormatError(
                f"the tensors in {weights_path} do not match the sha256 that {config_path.name} records for them: "
                "the file is corrupted or was changed after saving; download or save it again"
            )
        for name, target in expected.items():
            source = tensors[name]
            if source.shape != target.shape:
                raise DictionaryFormatError(
                    f"tensor {name} has shape {tuple(source.shape)}, config.json implies {tuple(target.shape)}"
                )
            check_tensor(name, source)
            with torch.no_grad():
                target.copy_(source.to(target.dtype))
        return dictionary

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool = False, **kwargs) -> str:
        """Publish to the Hugging Face Hub (fp16 weights); returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, dtype=torch.float16)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, **kwargs)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors as stored: names, dtypes, shapes and bytes, in name order. Saved in config.json and
    checked at load, it catches corruption that leaves every value finite (a flipped bit)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_tensor(name: str, tensor: torch.Tensor) -> None:
    """Raise :class:`DictionaryFormatError` unless the stored tensor ``name`` is float and finite, decoder atoms
    (``W_dec`` rows) are unit vectors, and rotary frequencies are positive: a zeroed, rescaled or boolean atom
    passes every shape check but codes every vector wrongly."""
    if not tensor.is_floating_point():
        raise DictionaryFormatError(f"tensor {name} has dtype {tensor.dtype}; dictionary tensors are floats")
    values = tensor.float()  # float8 files are read as float32: torch cannot check float8 tensors in place
    if not torch.isfinite(values).all():
        raise DictionaryFormatError(f"tensor {name} holds non-finite values; the file is corrupted")
    if name.endswith("W_dec"):
        tolerance = max(ATOM_NORM_TOLERANCE, torch.finfo(tensor.dtype).eps)
        norms = values.double().norm(dim=-1)  # float32 squares of 1e-30 underflow to a norm of 0
        worst = int((norms - 1).abs().argmax())
        if abs(float(norms[worst]) - 1) > tolerance:
            raise DictionaryFormatError(
                f"tensor {name}: atom {worst} has norm {float(norms[worst]):.4g}, and decoder atoms are unit vectors "
                f"(to within {tolerance:g}): the file is corrupted or its atoms were never normalised "
                "(TopKSAE.normalize_decoder() does that)"
            )
    if name.endswith("rope_inv_freq") and not (values > 0).all():
        raise DictionaryFormatError(f"tensor {name} holds rotary frequencies <= 0; the file is corrupted")


def model_card(config: KVDictionaryConfig, weights_path: Path) -> str:
    """A README.md for a dictionary folder: what it is for and what it measured."""
    size_mb = weights_path.stat().st_size / 2**20 if weights_path.exists() else float("nan")
    training = config.training or {}
    evaluation = config.evaluation or {}
    sharing = "one per KV head" if config.per_head else "shared by KV heads"
    lines = [
        "---",
        "library_name: sta_cache",
        f"base_model: {config.base_model}",
        "tags: [kv-cache, sparse-autoencoder, sta-attention]",
        "---",
        f"# STA-Attention KV dictionaries for {config.base_model}",
        "",
        "Per-layer dictionaries of atoms for `sta_cache.SparseSemanticCache`: each cached key and value vector is",
        "stored as k atom indices and k coefficients.",
        "",
        "| field | value |",
        "| --- | --- |",
        f"| base model | `{config.base_model}` |",
        f"| layers with dictionaries | {len(config.layer_indices)} of {config.num_layers} |",
        f"| KV heads / head_dim | {config.num_kv_heads} / {config.head_dim} |",
        f"| atoms per dictionary (N) | {config.n_atoms} ({sharing}) |",
        f"| default budget k_key / k_value | {config.k_key} / {config.k_value} |",
        f"| key space / encoder | {config.key_space} / {config.encoder} |",
        f"| file size | {size_mb:.2f} MiB |",
        f"| training text | {training.get('text', 'unknown')} |",
        f"| training tokens | {training.get('tokens', 'unknown')} |",
        f"| training method | {training.get('method', 'unknown')} |",
    ]
    if training.get("world_size", 1) > 1:
        lines.append(
            f"| trained by | {training['world_size']} processes (torch.distributed, {training.get('shard')}) |"
        )
    for key, value in evaluation.items():
        if not isinstance(value, dict):
            lines.append(f"| {key} | {value} |")
    per_layer = evaluation.get("per_layer")
    if isinstance(per_layer, dict) and per_layer:
        kinds = list(next(iter(per_layer.values())))
        lines += [
            "",
            "Held-out reconstruction cosine per layer:",
            "",
            "| layer | " + " | ".join(kinds) + " |",
            "| --- |" + " ---: |" * len(kinds),
        ]
        lines += [
            f"| {layer} | " + " | ".join(str(row[kind]) for kind in kinds) + " |" for layer, row in per_layer.items()
        ]
    lines += [
        "",
        "```python",
        "from sta_cache import SparseSemanticCache",
        "",
        "cache = SparseSemanticCache.from_pretrained(PATH_OR_REPO_ID, config=model.config)",
        "out = model.generate(**inputs, past_key_values=cache, max_new_tokens=200)",
        "```",
        "",
    ]
    return "\n".join(lines)
