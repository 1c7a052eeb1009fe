"""The pretraining loader: sharded token files read through a global index of windows.

The tokenizer step writes each split as shards (`train-00000.bin` tokens, `.idx.npy` document
(start, end) offsets, `.docs.jsonl` one line per document); within a shard the documents of one
origin (one entry of data.sources) are contiguous. An origin's token stream is the concatenation
of its pieces over the shards, cut into windows of seq_len + 1 tokens that overlap by one token.

Training sample i is a pure function of (seed, i), computed without any table: a cycle of the
mixture holds `draws[o]` samples from each origin o (its window count, or what `[[data.mix]]`
asks); a keyed Feistel permutation with cycle-walking shuffles the cycle's slots, and a second
one picks which window of the origin a slot reads. Memory is O(shards + origins) at any corpus
size, every process computes the same order (each reads only its own rows), a resumed run
continues from the step number alone, and the permutation runs backwards too: `sample_positions`
finds every sample that read a given window, which is how a takedown finds the training steps.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomlab.data.tokens import shard_files
from atomlab.errors import AtomlabError
from atomlab.train.loop import Rows

MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=4096)
def derive_key(seed: int, *parts: Any) -> int:
    """A 64-bit key for one permutation, from the recipe seed and what the permutation is for."""
    digest = hashlib.sha256(json.dumps([seed, *parts], separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing hash of 64-bit integers (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of [0, size) keyed by a 64-bit key, in O(1) memory: a balanced Feistel network on
    the smallest even number of bits covering size, walked until it lands back inside the range."""

    ROUNDS = 6

    def __init__(self, size: int, key: int) -> None:
        if size < 1:
            raise ValueError("a permutation needs at least one element")
        self.size = size
        self.half = max(1, math.ceil((size - 1).bit_length() / 2))
        self.mask = np.uint64((1 << self.half) - 1)
        self.round_keys = [np.uint64(derive_key(key, "round", r)) for r in range(self.ROUNDS)]

    def _rounds(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def _walk(self, values: Iterable[int] | np.ndarray, step: Any) -> np.ndarray:
        x = np.asarray(values, dtype=np.uint64).copy()
        if x.size and int(x.max()) >= self.size:
            raise IndexError(f"permutation of {self.size} elements: index {int(x.max())} out of range")
        outside = np.ones(x.shape, dtype=bool)
        while outside.any():  # cycle-walking: at most a few rounds, the domain is < 4 x size
            x[outside] = step(x[outside])
            outside = x >= np.uint64(self.size)
        return x.astype(np.int64)

    def forward(self, values: Iterable[int] | np.ndarray) -> np.ndarray:
        return self._walk(values, lambda x: self._rounds(x, self.round_keys))

    def inverse(self, values: Iterable[int] | np.ndarray) -> np.ndarray:
        def backwards(x: np.ndarray) -> np.ndarray:  # a Feistel round undone: swap the halves around it
            swapped = ((x & self.mask) << np.uint64(self.half)) | (x >> np.uint64(self.half))
            out = self._rounds(swapped, self.round_keys[::-1])
            return ((out & self.mask) << np.uint64(self.half)) | (out >> np.uint64(self.half))

        return self._walk(values, backwards)


@functools.lru_cache(maxsize=1024)
def _permutation(size: int, key: int) -> Permutation:
    return Permutation(size, key)


class TokenShards:
    """One split of a tokenizer folder: its shards memory-mapped on first use, and each origin's
    token stream as a list of (shard, start, end) pieces."""

    def __init__(self, folder: Path, split: str) -> None:
        self.folder, self.split = Path(folder), split
        try:
            summary = json.loads((self.folder / "shards.json").read_text(encoding="utf-8"))
            self.entries: list[dict[str, Any]] = summary["shards"][split]
            self.dtype = np.dtype(summary["dtype"])
        except (OSError, ValueError, KeyError):
            raise AtomlabError(
                f"{self.folder / 'shards.json'}: no {split} shards listed (a tokenizer folder from an older "
                "atomlab? rerun the tokenizer step)"
            ) from None
        pieces: dict[str, list[tuple[int, int, int]]] = {}
        for number, entry in enumerate(self.entries):
            for origin, (start, end) in sorted(entry["segments"].items(), key=lambda item: item[1][0]):
                pieces.setdefault(origin, []).append((number, start, end))
        self.origins = sorted(pieces)
        self.pieces = {origin: np.asarray(p, dtype=np.int64) for origin, p in pieces.items()}
        # where each piece begins in its origin's stream
        self.piece_offsets = {
            o: np.concatenate([[0], np.cumsum(p[:, 2] - p[:, 1])]).astype(np.int64) for o, p in self.pieces.items()
        }
        self._tokens: dict[int, np.ndarray] = {}
        self._index: dict[int, np.ndarray] = {}
        self._documents: dict[int, list[dict[str, Any]]] = {}

    @property
    def total_tokens(self) -> int:
        return sum(int(entry["tokens"]) for entry in self.entries)

    def origin_tokens(self, origin: str) -> int:
        return int(self.piece_offsets[origin][-1])

    def tokens(self, shard: int) -> np.ndarray:
        if shard not in self._tokens:
            path = shard_files(self.folder, self.entries[shard]["name"])[0]
            self._tokens[shard] = (
                np.memmap(path, dtype=self.dtype, mode="r") if path.stat().st_size else np.zeros(0, self.dtype)
            )
        return self._tokens[shard]

    def index(self, shard: int) -> np.ndarray:
        """(documents, 2) int64 (start, end) token offsets of the shard's documents, end exclusive."""
        if shard not in self._index:
            self._index[shard] = np.load(shard_files(self.folder, self.entries[shard]["name"])[1], mmap_mode="r")
        return self._index[shard]

    def documents(self, shard: int) -> list[dict[str, Any]]:
        """The shard's document records (id, origin, source, licence, sha256), in index order."""
        if shard not in self._documents:
            with open(shard_files(self.folder, self.entries[shard]["name"])[2], encoding="utf-8") as handle:
                self._documents[shard] = [json.loads(line) for line in handle]
        return self._documents[shard]

    def locate(self, origin: str, start: int, stop: int) -> list[tuple[int, int, int]]:
        """The (shard, start, end) pieces that hold tokens [start, stop) of an origin's stream."""
        pieces, offsets = self.pieces[origin], self.piece_offsets[origin]
        found = []
        at = int(np.searchsorted(offsets, start, side="right")) - 1
        while start < stop and at < len(pieces):
            shard, first, _ = (int(v) for v in pieces[at])
            begin = first + start - int(offsets[at])
            end = first + min(stop, int(offsets[at + 1])) - int(offsets[at])
            found.append((shard, begin, end))
            start = int(offsets[at + 1])
            at += 1
        return found

    def read(self, origin: str, start: int, stop: int) -> np.ndarray:
        parts = [self.tokens(shard)[begin:end] for shard, begin, end in self.locate(origin, start, stop)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def documents_in(self, shard: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """(row, overlap start, overlap end) of the documents that overlap tokens [start, end) of a shard."""
        index = self.index(shard)
        first = int(np.searchsorted(index[:, 1], start, side="right"))
        last = int(np.searchsorted(index[:, 0], end, side="left"))
        return [(row, max(start, int(index[row, 0])), min(end, int(index[row, 1]))) for row in range(first, last)]

    def stream_position(self, origin: str, shard: int, token: int) -> int:
        """Where token `token` of shard `shard` (a token of `origin`) sits in the origin's stream."""
        pieces = self.pieces[origin]
        at = int(np.flatnonzero(pieces[:, 0] == shard)[0])
        return int(self.piece_offsets[origin][at]) + token - int(pieces[at, 1])


class WindowLoader(Rows):
    """Rows for pretraining and validation: window w of the split is inputs w[:-1], targets w[1:].

    `batch(first, size)` draws samples first .. first+size-1 of the seeded mixture order; `rows()`
    reads windows by their global id (origins in name order, each origin's windows in stream order).
    """

    def __init__(self, shards: TokenShards, seq_len: int, seed: int, mix: Sequence[Any] = ()) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.origins = [o for o in shards.origins if (shards.origin_tokens(o) - 1) // seq_len >= 1]
        self.windows = np.asarray([(shards.origin_tokens(o) - 1) // seq_len for o in self.origins], dtype=np.int64)
        self.window_offsets = np.concatenate([[0], np.cumsum(self.windows)]).astype(np.int64)
        self.count = int(self.window_offsets[-1])
        self.draws = self._draws(list(mix))
        self.draw_offsets = np.concatenate([[0], np.cumsum(self.draws)]).astype(np.int64)
        self.cycle = int(self.draw_offsets[-1])  # samples per cycle of the mixture

    def _draws(self, mix: list[Any]) -> np.ndarray:
        windows = dict(zip(self.origins, (int(w) for w in self.windows), strict=True))
        amounts = {}
        for number, entry in enumerate(mix):
            if entry.source not in windows:
                have = ", ".join(self.origins) or "none"
                raise AtomlabError(
                    f"data.mix[{number}].source: no {self.shards.split} windows of {self.seq_len + 1} tokens from "
                    f"{entry.source!r} (origins with data: {have}); drop the entry or add data"
                )
            amounts[entry.source] = entry
        weighted = [o for o in self.origins if o in amounts and amounts[o].weight is not None]
        pool = sum(windows[o] for o in weighted)
        total_weight = sum(amounts[o].weight for o in weighted)
        draws = []
        for origin in self.origins:
            entry = amounts.get(origin)
            if entry is None:
                draws.append(windows[origin])
            elif entry.weight is not None:
                draws.append(max(1, round(pool * entry.weight / total_weight)))
            else:
                draws.append(max(1, round(windows[origin] * entry.epochs)))
        return np.asarray(draws, dtype=np.int64)

    def sample_windows(self, samples: Iterable[int] | np.ndarray) -> np.ndarray:
        """The global window id each training sample reads: a pure function of (seed, sample)."""
        samples = np.asarray(samples, dtype=np.int64)
        cycles, positions = np.divmod(samples, self.cycle)
        slots = np.empty_like(samples)
        for cycle in np.unique(cycles):
            chosen = cycles == cycle
            slots[chosen] = _permutation(self.cycle, derive_key(self.seed, "cycle", int(cycle))).forward(
                positions[chosen]
            )
        origin = np.searchsorted(self.draw_offsets, slots, side="right") - 1
        repeat, within = np.divmod(slots - self.draw_offsets[origin], self.windows[origin])
        windows = np.empty_like(samples)
        for key in sorted(set(zip(origin.tolist(), cycles.tolist(), repeat.tolist(), strict=True))):
            o, cycle, rep = key
            chosen = (origin == o) & (cycles == cycle) & (repeat == rep)
            windows[chosen] = self._origin_permutation(o, cycle, rep).forward(within[chosen])
        return self.window_offsets[origin] + windows

    def _origin_permutation(self, origin: int, cycle: int, repeat: int) -> Permutation:
        key = derive_key(self.seed, "windows", self.origins[origin], cycle, repeat)
        return _permutation(int(self.windows[origin]), key)

    def sample_positions(self, window_ids: Iterable[int] | np.ndarray, total_samples: int) -> np.ndarray:
        """Every sample index below total_samples that reads one of these windows (the permutation run
        backwards, one cycle and repeat at a time: no pass over the training order)."""
        window_ids = np.asarray(window_ids, dtype=np.int64)
        found = []
        for origin in np.unique(np.searchsorted(self.window_offsets, window_ids, side="right") - 1):
            low, high = self.window_offsets[origin], self.window_offsets[origin + 1]
            local = window_ids[(window_ids >= low) & (window_ids < high)] - low
            draws, windows = int(self.draws[origin]), int(self.windows[origin])
            for cycle in range(math.ceil(total_samples / self.cycle)):
                slot_permutation = _permutation(self.cycle, derive_key(self.seed, "cycle", cycle))
                for rep in range(math.ceil(draws / windows)):
                    within = rep * windows + self._origin_permutation(int(origin), cycle, rep).inverse(local)
                    within = within[within < draws]
                    samples = cycle * self.cycle + slot_permutation.inverse(self.draw_offsets[origin] + within)
                    found.append(samples[samples < total_samples])
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def window_origin(self, window_id: int) -> tuple[str, int]:
        """The origin of a window and where it starts in that origin's stream."""
        origin = int(np.searchsorted(self.window_offsets, window_id, side="right")) - 1
        return self.origins[origin], int(window_id - self.window_offsets[origin]) * self.seq_len

    def window_pieces(self, window_id: int) -> list[tuple[int, int, int]]:
        """The (shard, start, end) token ranges a window reads."""
        origin, start = self.window_origin(window_id)
        return self.shards.locate(origin, start, start + self.seq_len + 1)

    def windows_of_span(self, origin: str, start: int, end: int) -> np.ndarray:
        """Global ids of the windows that read any of tokens [start, end) of an origin's stream."""
        o = self.origins.index(origin)
        first = max(0, -((self.seq_len - start) // self.seq_len))
        last = min(int(self.windows[o]) - 1, (end - 1) // self.seq_len)
        return self.window_offsets[o] + np.arange(first, last + 1, dtype=np.int64)

    def window(self, window_id: int) -> np.ndarray:
        origin, start = self.window_origin(window_id)
        return self.shards.read(origin, start, start + self.seq_len + 1)

    def rows(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return rows[:, :-1], rows[:, 1:]

    def order(self, i: int) -> int:
        return int(self.sample_windows([i])[0])

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows(self.sample_windows(np.arange(first, first + size)))


LOADER_RECORD = "loader.json"


def write_loader_record(
    folder: Path, tokenizer_folder: Path, loader: WindowLoader, train: Any, mix: Sequence[Any]
) -> None:
    """What a pretrain folder needs to replay its data order: the token files, window length, seed, mixture
    and batch layout (written at the start, so an interrupted run can be explained too)."""
    from atomlab.steps import write_json

    write_json(
        folder / LOADER_RECORD,
        {
            "tokenizer": Path(tokenizer_folder).name,  # a sibling folder under the run's out_dir
            "seq_len": loader.seq_len,
            "seed": loader.seed,
            "samples_per_step": train.batch_size * train.grad_accum,
            "max_steps": train.max_steps,
            "mix": [entry.model_dump() for entry in mix],
        },
    )


def load_loader(pretrain_folder: Path) -> tuple[WindowLoader, dict[str, Any]]:
    """The training loader of a pretrain folder, rebuilt from its loader.json."""
    from atomlab.recipe import MixEntry

    path = Path(pretrain_folder) / LOADER_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise AtomlabError(f"{path}: missing or unreadable; give a pretrain folder written by this atomlab") from None
    tokenizer_folder = Path(pretrain_folder).parent / record["tokenizer"]
    mix = [MixEntry(**entry) for entry in record["mix"]]
    return WindowLoader(TokenShards(tokenizer_folder, "train"), record["seq_len"], record["seed"], mix), record


def trained_tokens(loader: WindowLoader, total_samples: int, chunk: int = 1 << 16) -> dict[tuple[str, str], int]:
    """Target tokens read per (source, licence) by samples 0 .. total_samples-1, streamed in chunks."""
    counts: dict[tuple[str, str], int] = {}
    for first in range(0, total_samples, chunk):
        windows, repeats = np.unique(
            loader.sample_windows(np.arange(first, min(total_samples, first + chunk))), return_counts=True
        )
        for window_id, times in zip(windows.tolist(), repeats.tolist(), strict=True):
            origin, start = loader.window_origin(window_id)
            for shard, begin, end in loader.shards.locate(origin, start + 1, start + loader.seq_len + 1):
                records = loader.shards.documents(shard)
                for row, low, high in loader.shards.documents_in(shard, begin, end):
                    key = (origin, records[row].get("license", "unspecified"))
                    counts[key] = counts.get(key, 0) + (high - low) * times
    return counts


def write_trained_mix(folder: Path, loader: WindowLoader, total_samples: int) -> dict[str, Any]:
    """data_mix.json: per source the windows available and drawn per cycle, and the tokens actually
    trained per source and licence."""
    from atomlab.steps import write_json

    counts = trained_tokens(loader, total_samples)
    summary = {
        "samples": total_samples,
        "tokens_per_sample": loader.seq_len,
        "cycle": loader.cycle,
        "sources": [
            {"source": o, "windows": int(w), "draws_per_cycle": int(d)}
            for o, w, d in zip(loader.origins, loader.windows, loader.draws, strict=True)
        ],
        "by_source_license": [{"source": o, "license": lic, "tokens": n} for (o, lic), n in sorted(counts.items())],
    }
    write_json(folder / "data_mix.json", summary)
    return summary


def held_out_documents(tokenizer_folder: Path) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """Each validation document's record and token ids, in shard order, read from the token files."""
    shards = TokenShards(tokenizer_folder, "val")
    for shard in range(len(shards.entries)):
        tokens = shards.tokens(shard)
        for record, (start, end) in zip(shards.documents(shard), shards.index(shard).tolist(), strict=True):
            yield record, tokens[start:end].astype(np.int64).tolist()
