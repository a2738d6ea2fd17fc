"""grain pipelines from tokenized records to per-process batches of fixed-shape numpy arrays.

    records, counts = tokenize_sft(examples, tok, "tiny", seq_len=64)
    it = make_sft_iterator(records, seq_len=64, batch_rows_per_process=8, packing=True, shuffle=True,
                           seed=0, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # {"tokens": int32[8, 64], "targets", "loss_mask" (float32), "positions", "segment_ids"}
    state = it.get_state()    # save with the checkpoint; it.set_state(state) resumes exactly

Order of operations (all grain ``MapDataset`` index arithmetic, so random access and tiny state):
shuffle the whole epoch by ``seed`` -> take this process's slice ``[process_index::process_count]`` ->
repeat (grain re-seeds the shuffle per epoch, so each epoch has a different order) -> rows (packed or
padded) -> batch. Within an epoch the processes' slices are disjoint and together cover every example.
No worker processes or threads: the records are in memory and the result is deterministic.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from jalign.data.formats import DataError
from jalign.data.packing import empty_like, pack, pad_row
from jalign.errors import ConfigError


def read_options():
    import grain

    # In-memory records: threads would only add GIL contention (grain's own advice for this case).
    return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _check(records: Sequence, batch_rows_per_process: int, process_index: int, process_count: int):
    if not records:
        raise DataError("no examples to iterate over (an empty data set, or every example was dropped: "
                        "see data.seq_len and data.overlong)")
    if batch_rows_per_process < 1:
        raise ValueError(f"batch_rows_per_process must be >= 1, got {batch_rows_per_process}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(records) < process_count:
        raise DataError(f"{len(records)} examples cannot be sharded over {process_count} processes")


def _check_packable(records: Sequence, packing: bool):
    if packing and "tokens" not in records[0]:
        raise ValueError("packing here needs flat SFT records; paired (chosen/rejected) records are packed by "
                         "make_packed_pair_iterator")


def epoch_stream(records: Sequence, *, shuffle: bool, seed: int, process_index: int, process_count: int,
            repeat: bool):
    """This process's stream of records: shuffled per epoch, sliced by process, maybe repeated (a
    :class:`jalign.data.mixture.Mixture`: its weighted stream of its sources, always repeated)."""
    import grain

    from jalign.data.mixture import Mixture

    if isinstance(records, Mixture):
        if not repeat:
            raise ValueError("a mixture of sources is an infinite stream: it has no single epoch")
        return records.stream(shuffle=shuffle, seed=seed, process_index=process_index, process_count=process_count)

    ds = grain.MapDataset.source(list(records))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count]
    if repeat:
        ds = ds.repeat()  # reseed_each_epoch=True: epoch e is shuffled with seed + e
    return ds


def batch_stream(rows, batch_rows_per_process: int, prefetch: int):
    import grain

    batches = rows.batch(batch_rows_per_process, drop_remainder=True)
    if prefetch:
        # One background thread builds the next batches while the device computes. grain stores the
        # state with each prefetched batch, so get_state() still names exactly the batches consumed.
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    return iter(batches)


def make_sft_iterator(records: Sequence[dict], *, seq_len: int, batch_rows_per_process: int,
                      packing: bool, shuffle: bool, seed: int, process_index: int = 0,
                      process_count: int = 1, repeat: bool = True, packing_bins: Optional[int] = None,
                      prefetch: int = 0):
    """A checkpointable grain ``DatasetIterator`` of training batches for this process.

    Each ``next()`` is a dict of numpy arrays ``[batch_rows_per_process, seq_len]``: ``tokens``,
    ``targets``, ``positions``, ``segment_ids`` (int32) and ``loss_mask`` (float32). With ``packing``,
    several records share a row (grain first-fit over ``packing_bins`` open rows, default the batch
    size); without, one record per row, padded. ``repeat=False`` stops after one epoch (the last,
    incomplete batch is dropped so shapes never change). ``prefetch > 0`` builds that many batches
    ahead in one thread (same batches, same state; grain's packing costs ~0.1 ms per example).
    """
    _check(records, batch_rows_per_process, process_index, process_count)
    _check_packable(records, packing)
    ds = epoch_stream(records, shuffle=shuffle, seed=seed, process_index=process_index,
                 process_count=process_count, repeat=repeat)
    if packing:
        rows = pack(ds.to_iter_dataset(read_options()), seq_len, packing_bins or batch_rows_per_process)
    else:
        rows = ds.map(lambda r: pad_row(r, seq_len)).to_iter_dataset(read_options())
    return batch_stream(rows, batch_rows_per_process, prefetch)


def make_packed_pair_iterator(records: Sequence[dict], make_row, *, seq_len: int, batch_rows_per_process: int,
                              max_pairs: int, shuffle: bool, seed: int, process_index: int = 0,
                              process_count: int = 1, repeat: bool = True, packing_bins: Optional[int] = None,
                              prefetch: int = 0):
    """A checkpointable iterator of packed pair batches (``jalign.data.packing.pack_pairs``): rows
    [batch_rows_per_process, seq_len] holding up to ``max_pairs`` whole pairs each (segments 2k+1 / 2k+2) and
    per-pair tables [batch_rows_per_process, max_pairs, ...]. ``make_row`` turns a record into a two-sided row
    (e.g. ``PairData.make_row``); ``seq_len`` is the packed row length (at least the longest pair's two sides).
    The number of pairs per batch varies: the losses normalise by the valid pairs they see."""
    from jalign.data.packing import pack_pairs

    _check(records, batch_rows_per_process, process_index, process_count)
    ds = epoch_stream(records, shuffle=shuffle, seed=seed, process_index=process_index,
                      process_count=process_count, repeat=repeat)
    example = make_row(records[0])
    rows = pack_pairs(ds.map(make_row).to_iter_dataset(read_options()), seq_len,
                      packing_bins or batch_rows_per_process, max_pairs, example)
    return batch_stream(rows, batch_rows_per_process, prefetch)


def _packed_pair_shard(records: Sequence[dict], make_row, seq_len: int, max_pairs: int, process_index: int,
                       process_count: int, packing_bins: int) -> list:
    import grain

    from jalign.data.packing import pack_pairs

    shard = grain.MapDataset.source(list(records))[process_index::process_count]
    if not len(shard):
        return []
    example = make_row(records[0])
    return list(pack_pairs(shard.map(make_row).to_iter_dataset(read_options()), seq_len, packing_bins, max_pairs,
                           example))


def make_packed_pair_eval_iterator(records: Sequence[dict], make_row, *, seq_len: int, batch_rows_per_process: int,
                                   max_pairs: int, process_index: int = 0, process_count: int = 1,
                                   packing_bins: Optional[int] = None):
    """One ordered pass over ``records`` as packed pair batches (like :func:`make_packed_pair_iterator`, no
    shuffle, no repeat); every process yields the same number of batches, the last ones filled with empty rows
    (segment ids 0, ``valid`` 0 in every pair slot), so summed eval metrics cover every pair exactly once."""
    import grain

    if batch_rows_per_process < 1 or not 0 <= process_index < process_count:
        raise ValueError("bad batch_rows_per_process / process_index / process_count")
    if not records:
        raise DataError("no eval examples (an empty eval set, or every example was dropped: see data.seq_len)")
    bins = packing_bins or batch_rows_per_process
    # each process packs every shard (cheap for eval-sized data, deterministic) to agree on the batch count
    shards = [_packed_pair_shard(records, make_row, seq_len, max_pairs, p, process_count, bins)
              for p in range(process_count)]
    num_batches = max(math.ceil(len(s) / batch_rows_per_process) for s in shards)
    rows = shards[process_index]
    template = next(s[0] for s in shards if s)
    rows = rows + [empty_like(template)] * (num_batches * batch_rows_per_process - len(rows))
    return iter(grain.MapDataset.source(rows).batch(batch_rows_per_process).to_iter_dataset(read_options()))


def _shard_rows(records: Sequence[dict], seq_len: int, packing: bool, process_index: int,
                process_count: int, packing_bins: int) -> list:
    import grain

    shard = grain.MapDataset.source(list(records))[process_index::process_count]
    if not packing:
        return [pad_row(r, seq_len) for r in shard]
    return list(pack(shard.to_iter_dataset(read_options()), seq_len, packing_bins))


def make_eval_iterator(records: Sequence[dict], *, seq_len: int, batch_rows_per_process: int,
                       packing: bool = False, process_index: int = 0, process_count: int = 1,
                       packing_bins: Optional[int] = None):
    """One pass over ``records`` in order; every process yields the same number of batches.

    Each process takes the slice ``[process_index::process_count]``; the last batches are filled with
    empty rows (loss_mask 0, segment_ids 0), so summed losses and token counts are exact and all
    processes run the same number of (collective) eval steps. Works for SFT and preference records.
    """
    import grain

    if batch_rows_per_process < 1 or not 0 <= process_index < process_count:
        raise ValueError("bad batch_rows_per_process / process_index / process_count")
    if not records:
        raise DataError("no eval examples (an empty eval set, or every example was dropped: see data.seq_len)")
    _check_packable(records, packing)
    bins = packing_bins or batch_rows_per_process
    shards = [_shard_rows(records, seq_len, packing, p, process_count, bins) if (packing or p == process_index)
              else None for p in range(process_count)]
    # Row counts per process are known without packing; with packing each process packs every
    # shard (cheap for eval-sized data, and deterministic) to agree on the number of batches.
    counts = [len(s) if s is not None else len(range(p, len(records), process_count))
              for p, s in enumerate(shards)]
    num_batches = max(math.ceil(c / batch_rows_per_process) for c in counts)
    rows = shards[process_index]
    template = rows[0] if rows else empty_like(pad_row(records[0], seq_len))
    rows = rows + [empty_like(template)] * (num_batches * batch_rows_per_process - len(rows))
    return iter(grain.MapDataset.source(rows).batch(batch_rows_per_process).to_iter_dataset(read_options()))


def count_tokens(batch: dict) -> int:
    """Number of loss-bearing target tokens in a batch (host-side, for logging)."""
    if "loss_mask" in batch:
        return int(np.asarray(batch["loss_mask"]).sum())
    return sum(count_tokens(v) for v in batch.values() if isinstance(v, dict))


# ---- config-driven data for the algorithms ------------------------------------------------------
TRAIN_PREFETCH = 2  # batches built ahead in a thread, overlapping host data work with device steps


def _process_info(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only here: everything above works without JAX

        return jax.process_index(), jax.process_count()
    return process_index, process_count


class ConfigData:
    """Shared plumbing: load + validate + tokenize once (eagerly), then hand out grain iterators."""

    kind = ""

    def __init__(self, cfg, tokenizer, *, log=print, process_index: Optional[int] = None,
                 process_count: Optional[int] = None):
        from jalign.data.sources import load_source

        self.cfg, self.tokenizer, self.log = cfg, tokenizer, log
        self.process_index, self.process_count = _process_info(process_index, process_count)
        if cfg.train.global_batch % self.process_count:
            raise ConfigError(f"{cfg.source or '<config>'}: train.global_batch={cfg.train.global_batch} is not "
                              f"divisible by {self.process_count} processes")
        self.rows = cfg.train.global_batch // self.process_count
        d = cfg.data
        from jalign.data.chat import describe_template

        self.log(f"data: {describe_template(d.chat_template, tokenizer)}")
        self.train_records = self._load_train(load_source)
        self._load_eval(load_source)

    def _load_train(self, load_source):
        """The training records: one source's list, or a :class:`Mixture` of ``data.train``'s sources."""
        from jalign.config import train_sources
        from jalign.data.mixture import Mixture

        d = self.cfg.data
        sources, parts, self.train_examples = train_sources(d), [], []
        for src in sources:
            examples = self._load(load_source, src.source, d.max_examples, src.fields or d.fields)
            records = self._tokenize(src.source, examples)
            self._check_kept("train", src.source, examples, records)
            self.train_examples += examples
            parts.append(records)
        if isinstance(d.train, str):
            return parts[0]
        return Mixture(parts, [s.weight for s in sources], [s.source for s in sources])

    def _load_eval(self, load_source) -> None:
        """Every eval set, concatenated (``eval_records``; ``index`` renumbered), and each set's range in
        ``eval_sets`` ({name: (start, stop)}, name None for one unnamed set). Generation-based evaluation uses
        the first set's examples."""
        from jalign.config import eval_sources
        from jalign.data.mixture import concatenate

        d = self.cfg.data
        parts, names, self.eval_examples_raw = [], [], []
        for name, src in eval_sources(d).items():
            examples = self._load(load_source, src.source, None, src.fields or d.fields)
            records = self._tokenize(src.source, examples)
            self._check_kept("eval" if name is None else f"eval.{name}", src.source, examples, records)
            self.eval_examples_raw = self.eval_examples_raw or examples
            parts.append(records)
            names.append(name)
        self.eval_records, ranges = concatenate(parts)
        self.eval_sets = dict(zip(names, ranges))
        self.has_eval = bool(self.eval_records)
        self._selected_eval = names[0] if names else None
        self._eval_batches = {}

    @property
    def eval_set_names(self) -> list:
        """The eval sets' names in config order ([None] for one unnamed set, [] without eval data)."""
        return list(self.eval_sets)

    def select_eval(self, name) -> None:
        """Make ``eval_iterator()`` iterate over the eval set ``name`` (one of :attr:`eval_set_names`)."""
        if name not in self.eval_sets:
            raise KeyError(f"no eval set {name!r} (have {self.eval_set_names})")
        self._selected_eval = name

    def selected_eval_records(self) -> list:
        start, stop = self.eval_sets[self._selected_eval]
        return self.eval_records[start:stop]

    def _load(self, load_source, spec: str, max_examples: Optional[int], fields: Optional[dict] = None) -> list:
        d = self.cfg.data
        examples, skipped = load_source(spec, self.kind, d.skip_bad_lines, seed=d.seed, max_examples=max_examples,
                                        fields=fields or None)
        for msg in skipped[:5]:
            self.log(f"data: skipped {msg}")
        if skipped:
            self.log(f"data: {spec}: skipped {len(skipped)} bad lines")
        return examples

    def _tokenize(self, spec: str, examples: list) -> list:
        raise NotImplementedError

    def _check_kept(self, split: str, spec: str, examples: list, records: list) -> None:
        """Examples that all vanished in tokenization: name the source and the key that dropped them."""
        if records or not examples:
            return
        d = self.cfg.data
        why = ("data.overlong=drop drops longer ones" if d.overlong == "drop" else
               "cut at data.seq_len, none keeps a response token")
        raise ConfigError(f"data.{split}={spec}: none of its {len(examples)} examples fits data.seq_len="
                          f"{d.seq_len} ({why}); raise data.seq_len")

    def _log_counts(self, spec: str, counts: dict) -> None:
        self.log(f"data: {spec}: {counts['examples']} examples ({counts['truncated']} truncated, "
                 f"{counts['dropped']} dropped at seq_len={self.cfg.data.seq_len}, overlong={self.cfg.data.overlong})")

    def tokenizer_dir(self) -> Optional[str]:
        """The HF tokenizer directory to copy on export (None for the built-in byte tokenizer)."""
        path = getattr(self.tokenizer, "path", None)
        return None if path is None else str(path.parent)

    def eval_examples(self, with_texts: bool = False) -> list[tuple]:
        """``(prompt_ids, reference_text)`` of held-out examples, for generation-based evaluation; with_texts:
        ``(prompt_ids, reference_text, prompt_text)`` (the prompt's text is what a rule reward sees)."""
        from jalign.data.chat import encode_prompt
        from jalign.data.prompts import prompt_text

        out = []
        for prompt, ref in (self._prompt_reference(ex) for ex in self.eval_examples_raw):
            if isinstance(ref, str):
                ids = encode_prompt(prompt, self.cfg.data.chat_template, self.tokenizer)
                out.append((ids, ref, prompt_text(prompt)) if with_texts else (ids, ref))
        return out

    def eval_iterator(self):
        """A fresh one-pass iterator over the eval set (same number of batches on every process).

        The batches are built once and kept: eval sets are small, and evaluation runs many times. With
        several named eval sets, the one chosen with :meth:`select_eval` (the first by default).
        """
        key = self._selected_eval
        if key not in self._eval_batches:
            self._eval_batches[key] = list(make_eval_iterator(
                self.selected_eval_records(), seq_len=self.cfg.data.seq_len, batch_rows_per_process=self.rows,
                packing=self._eval_packing, process_index=self.process_index,
                process_count=self.process_count))
        return iter(self._eval_batches[key])


class SFTData(ConfigData):
    """SFT data from ``cfg.data``: ``train_iterator()`` (checkpointable), ``eval_iterator()``; batches of
    (packed) rows with the fields of ``jalign.data.fields.SFT_FIELDS``."""

    kind = "sft"

    @property
    def fields(self) -> dict:
        from jalign.data.fields import SFT_FIELDS

        return SFT_FIELDS

    @property
    def _eval_packing(self) -> bool:
        return self.cfg.data.packing

    def _tokenize(self, spec, examples):
        from jalign.data.packing import tokenize_sft

        d = self.cfg.data
        records, counts = tokenize_sft(examples, self.tokenizer, d.chat_template, seq_len=d.seq_len,
                                       overlong=d.overlong)
        self._log_counts(spec, counts)
        return records

    @staticmethod
    def _prompt_reference(ex):
        if ex.messages is None:
            return ex.prompt, ex.response
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        return ex.messages[:last], ex.messages[last]["content"]

    def train_iterator(self):
        d = self.cfg.data
        return make_sft_iterator(self.train_records, seq_len=d.seq_len, batch_rows_per_process=self.rows,
                                 packing=d.packing, shuffle=d.shuffle, seed=d.seed,
                                 process_index=self.process_index, process_count=self.process_count,
                                 prefetch=TRAIN_PREFETCH)
