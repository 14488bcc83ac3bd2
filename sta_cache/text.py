"""Where training text comes from: a UTF-8 file, or a dataset of the ``datasets`` package, both streamed in blocks
so that no text is ever read whole."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK_CHARS = 1 << 20

__all__ = ["BLOCK_CHARS", "TextSource"]


@dataclass(frozen=True)
class TextSource:
    """A UTF-8 text file (``path``), or the ``column`` of a ``datasets`` dataset (``dataset``: a Hub id or a local
    folder of data files; ``subset``: its configuration name; ``split``), streamed row by row."""

    path: Path | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    column: str = "text"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("a text source is either a file (path) or a dataset, not both or neither")
        if self.path is not None:
            object.__setattr__(self, "path", Path(self.path))
            if not self.path.is_file():
                raise FileNotFoundError(f"training text {self.path} does not exist")

    @classmethod
    def of(cls, text: TextSource | str | os.PathLike) -> TextSource:
        """``text`` as a source: a source stays itself, anything else is a file path."""
        return text if isinstance(text, TextSource) else cls(path=Path(text))

    def name(self) -> str:
        """How the source is named in a dictionary's config and model card."""
        if self.path is not None:
            return self.path.name
        subset = f"/{self.subset}" if self.subset else ""
        return f"{self.dataset}{subset} [{self.split}] column {self.column!r}"

    def fingerprint(self) -> dict:
        """What identifies the text: a file's path and content digest, a dataset's name, subset, split and
        column."""
        if self.path is not None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return {"path": str(self.path), "sha256": digest.hexdigest()}
        return {"dataset": self.dataset, "subset": self.subset, "split": self.split, "column": self.column}

    def blocks(self) -> Iterator[str]:
        """The text in blocks of about ``BLOCK_CHARS`` characters, each ending at a line break (the last block
        excepted), so that a tokenizer never sees a line cut in two."""
        carry = ""
        for piece in self._pieces():
            text = carry + piece
            cut = text.rfind("\n") + 1
            if cut == 0:
                carry = text
                continue
            yield text[:cut]
            carry = text[cut:]
        if carry:
            yield carry

    def _pieces(self) -> Iterator[str]:
        if self.path is not None:
            with open(self.path, encoding="utf-8") as handle:
                yield from iter(lambda: handle.read(BLOCK_CHARS), "")
            return
        rows, size = [], 0
        for row in self._rows():
            rows.append(row)
            size += len(row)
            if size >= BLOCK_CHARS:
                yield "\n".join(rows) + "\n"
                rows, size = [], 0
        if rows:
            yield "\n".join(rows) + "\n"

    def _rows(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError as error:
            raise ImportError(
                f"reading the dataset {self.dataset!r} needs the `datasets` package: pip install 'sta_cache[datasets]'"
            ) from error
        stream = datasets.load_dataset(self.dataset, self.subset, split=self.split, streaming=True)
        for row in stream:
            if self.column not in row:
                raise KeyError(f"dataset {self.dataset!r} has no column {self.column!r}; it has {sorted(row)}")
            value = row[self.column]
            if not isinstance(value, str):
                raise TypeError(f"column {self.column!r} of {self.dataset!r} holds {type(value).__name__}, not text")
            yield value
