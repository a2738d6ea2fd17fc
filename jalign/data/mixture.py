"""Several data sources in one split: a weighted training mixture, or named eval sets.

    mix = Mixture([records_a, records_b], weights=[0.7, 0.3], names=["a.jsonl", "b.parquet"])
    ds = mix.stream(shuffle=True, seed=0, process_index=0, process_count=1)   # an infinite grain MapDataset
    len(mix), mix[i], list(mix)                                              # the concatenation, in order

Training draws from the sources in proportion to their weights, with grain's ``MapDataset.mix``: each source is
shuffled (its own seed, re-seeded every epoch of that source), sliced by process and repeated, and the mixture
interleaves them deterministically in the integer proportions grain derives from the weights, so any window of
the stream holds the sources in those proportions (to within one element per source and period) and a small
source repeats more often than a large one. It is a grain ``MapDataset`` like a single source's stream: the
iterator state (an index) is saved with each checkpoint and a resumed run continues exactly where it stopped.

As a sequence (ordered passes: precomputed columns, counts) a Mixture is the concatenation of its sources.
Records that carry an ``"index"`` (pairs, scored examples: the key of precomputed columns) are renumbered to
their position in that concatenation, so indices are unique across sources.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jalign.data.formats import DataError


def concatenate(parts: Sequence[list]) -> tuple[list, list[tuple[int, int]]]:
    """The records of ``parts`` in order, ``"index"`` renumbered to the position; and each part's range."""
    out, ranges = [], []
    for part in parts:
        start = len(out)
        for i, rec in enumerate(part):
            if isinstance(rec, dict) and "index" in rec:
                rec = {**rec, "index": start + i}
            out.append(rec)
        ranges.append((start, len(out)))
    return out, ranges


def part_seed(seed: int, part: int) -> int:
    """A shuffle seed per source (epoch e of a source is shuffled with this + e by grain's repeat)."""
    return int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


class Mixture(Sequence):
    """Sources with weights (see the module docstring)."""

    def __init__(self, parts: Sequence[list], weights: Sequence[float], names: Optional[Sequence[str]] = None):
        if len(parts) != len(weights) or not parts:
            raise ValueError("a mixture needs one weight per source and at least one source")
        if any(not (w > 0) for w in weights):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        self.names = list(names) if names is not None else [f"source {i}" for i in range(len(parts))]
        self.records, self.ranges = concatenate(parts)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]

    @property
    def parts(self) -> list[list]:
        return [self.records[a:b] for a, b in self.ranges]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def stream(self, *, shuffle: bool, seed: int, process_index: int, process_count: int):
        """The infinite weighted stream of this process's records (a grain ``MapDataset``)."""
        import grain

        from jalign.data.pipeline import epoch_stream

        streams = []
        for i, (name, part) in enumerate(zip(self.names, self.parts)):
            if len(part) < process_count:
                raise DataError(f"{name}: {len(part)} examples cannot be sharded over {process_count} processes")
            streams.append(epoch_stream(part, shuffle=shuffle, seed=part_seed(seed, i), process_index=process_index,
                                        process_count=process_count, repeat=True))
        return grain.MapDataset.mix(streams, self.weights)

    def source_of(self, record_index: int) -> int:
        """Which source the record at ``record_index`` of the concatenation came from."""
        for i, (a, b) in enumerate(self.ranges):
            if a <= record_index < b:
                return i
        raise IndexError(record_index)
