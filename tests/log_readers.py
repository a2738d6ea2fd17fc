"""Readers of what a run wrote, independent of the writers: TensorBoard event files (TFRecord framing of
``Event`` protos) and a W&B offline run (``run-ID.wandb``: LevelDB log framing of wandb ``Record`` protos)."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def tensorboard_events(run_dir) -> list:
    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(Path(run_dir, "tensorboard").glob("events.out.tfevents.*")):
        data, pos = f.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            body = data[pos + 12:pos + 12 + length]  # after the length and its crc
            pos += 12 + length + 4  # and the data's crc
            e = event_pb2.Event()
            e.ParseFromString(body)
            events.append(e)
    return events


def tensorboard_scalars(run_dir) -> dict:
    """{tag: {step: value}} of every scalar summary."""
    out: dict = {}
    for e in tensorboard_events(run_dir):
        for v in e.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, {})[e.step] = v.simple_value
    return out


def tensorboard_texts(run_dir) -> dict:
    """{tag: {step: text}} of every text summary (tensorboardX's add_text)."""
    out: dict = {}
    for e in tensorboard_events(run_dir):
        for v in e.summary.value:
            if v.metadata.plugin_data.plugin_name == "text":
                out.setdefault(v.tag.removesuffix("/text_summary"), {})[e.step] = \
                    v.tensor.string_val[0].decode("utf-8")
    return out


def wandb_history(run_dir) -> list[dict]:
    """The history rows ({key: value}, with "_step") of the W&B offline run in RUN_DIR/wandb."""
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    data, block, pos, records, buf = path.read_bytes(), 32768, 7, [], b""  # a 7-byte file header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too little room for a record header: the rest of the block is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            buf = chunk
        elif kind == 3:  # MIDDLE
            buf += chunk
        elif kind == 4:  # LAST
            records.append(buf + chunk)
    rows = []
    for raw in records:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
