"""Corpora, tokenizers and deterministic, resumable batching.

The embedded default corpus is the text of ``pydoc_data.topics`` (the Python
language reference topics, ~466 KB, shipped with every CPython), so training
needs no download. Text is tokenized to bytes by default (vocab 256); a Hugging
Face ``tokenizers`` JSON file can be used instead.

Batches are a pure function of ``(seed, step)``: batch ``s`` takes random
windows drawn with ``jax.random.fold_in(key(seed), s)``, so resuming at step
``s`` replays exactly the batches an uninterrupted run would have seen, and
every process of a multi-host run computes the same global batch indices and
materialises only the rows its devices hold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding


def default_corpus() -> str:
    """The embedded corpus: every ``pydoc_data.topics`` entry, sorted by topic."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); decoding replaces invalid sequences."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, tokens) -> str:
        data = bytes(int(t) for t in np.asarray(tokens).reshape(-1) if 0 <= int(t) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON file (``pip install tokenizers``)."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # optional dependency
            raise ImportError(
                "tokenizer files need the `tokenizers` package: pip install tokenizers"
            ) from e
        self.path = str(path)
        self.name = self.path
        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"tokenizer file {self.path!r} cannot be loaded: {e}") from None
        self.vocab_size = self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text).ids, np.int32)

    def decode(self, tokens) -> str:
        return self._tokenizer.decode([int(t) for t in np.asarray(tokens).reshape(-1)])


def load_tokenizer(name: str | None):
    """``None`` / ``"bytes"``: :class:`ByteTokenizer`; else a tokenizers JSON path."""
    if name in (None, "bytes"):
        return ByteTokenizer()
    if not Path(name).is_file():
        raise FileNotFoundError(f"tokenizer file {name!r} not found (or use 'bytes')")
    return HFTokenizer(name)


def load_tokens(data: str | None, tokenizer) -> np.ndarray:
    """Token ids ``int32 [n]`` of ``data``: None = embedded corpus, a ``.npy`` file
    of token ids, or a text file (or directory of ``*.txt``) to tokenize."""
    if data is None:
        return tokenizer.encode(default_corpus())
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"training data {data!r} not found")
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{data}: not a readable .npy token array ({e})") from None
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(
                f"{data}: expected a 1D integer token array, got {tokens.dtype}{tokens.shape}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
            raise ValueError(
                f"{data}: token ids span [{tokens.min()}, {tokens.max()}], outside the "
                f"tokenizer's vocab of {tokenizer.vocab_size}"
            )
        return tokens.astype(np.int32)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"no *.txt files in directory {data!r}")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"training text {str(file)!r} is not UTF-8 ({e.reason})") from None
    return tokenizer.encode("\n\n".join(texts))


@dataclasses.dataclass(frozen=True)
class TokenDataset:
    """Train / validation split of one token stream.

    The stream is cut into blocks of ``max(4096, seq_len + 1)`` tokens and every
    ``round(1 / validation_fraction)``-th block is held out, so validation samples
    the whole corpus (the tail of a sorted corpus is rarely representative).
    """

    train: np.ndarray
    validation: np.ndarray

    @classmethod
    def split(cls, tokens: np.ndarray, seq_len: int, validation_fraction: float = 0.05):
        block = max(4096, seq_len + 1)
        stride = max(2, round(1 / validation_fraction))
        num_blocks = len(tokens) // block
        held_out = [i for i in range(num_blocks) if i % stride == stride - 1]
        if not held_out:  # short streams: hold out the tail
            held_out = [num_blocks - 1] if num_blocks > 1 else []
        if not held_out:
            raise ValueError(
                f"{len(tokens)} tokens are too few for seq_len={seq_len}: need at least "
                f"{2 * block} to hold out a validation block"
            )
        is_val = np.zeros(len(tokens), bool)
        for i in held_out:
            is_val[i * block : (i + 1) * block] = True
        return cls(train=tokens[~is_val], validation=tokens[is_val])


def batch_indices(seed: int, step: int, batch_size: int, num_tokens: int, seq_len: int):
    """Start offsets ``int [batch_size]`` of the windows of batch ``step``."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    starts = jax.random.randint(key, (batch_size,), 0, num_tokens - seq_len)
    return np.asarray(jax.device_get(starts))


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    return tokens[starts[:, None] + np.arange(seq_len + 1)]


def train_batch(
    dataset: TokenDataset, seed: int, step: int, batch_size: int, seq_len: int, sharding=None
):
    """``int32 [batch_size, seq_len + 1]`` windows (inputs = ``[:, :-1]``, targets =
    ``[:, 1:]``); with a sharding, each process builds only its own rows."""
    starts = batch_indices(seed, step, batch_size, len(dataset.train), seq_len)
    return _place(
        lambda rows: _windows(dataset.train, starts[rows], seq_len), batch_size, seq_len, sharding
    )


def validation_batches(dataset: TokenDataset, batch_size: int, seq_len: int, max_batches: int):
    """Fixed, non-overlapping validation windows, at most ``max_batches`` batches."""
    per_batch = batch_size * seq_len
    count = min(max_batches, max(1, (len(dataset.validation) - 1) // per_batch))
    starts = np.arange(count * batch_size) * seq_len
    starts = starts % max(1, len(dataset.validation) - seq_len - 1)
    return [
        _windows(dataset.validation, starts[i * batch_size : (i + 1) * batch_size], seq_len)
        for i in range(count)
    ]


def _place(rows_fn, batch_size: int, seq_len: int, sharding):
    if sharding is None:
        return jax.numpy.asarray(rows_fn(slice(None)))
    assert isinstance(sharding, NamedSharding)
    return jax.make_array_from_callback(
        (batch_size, seq_len + 1), sharding, lambda index: rows_fn(index[0])[:, index[1]]
    )


def place_batch(batch: np.ndarray, sharding=None):
    """Puts a host batch (identical on every process) on ``sharding``."""
    return _place(lambda rows: batch[rows], batch.shape[0], batch.shape[1] - 1, sharding)
