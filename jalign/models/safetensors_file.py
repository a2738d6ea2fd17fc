"""Reading Hugging Face safetensors weights: every file validated before any tensor is read.

    weights = open_weights(hf_dir)       # {tensor name: SafetensorsFile}, from the index or model.safetensors
    view = weights[name].array(name)     # a read-only np.memmap in the file's layout (bf16 via ml_dtypes)

Validation is the ``safetensors`` library's own (``safe_open``): header length within the format's
100 MB cap, JSON, dtypes, data offsets contiguous and covering exactly the file. When it rejects a
file, :func:`check_safetensors` says what is wrong in words (truncated, header length, overlapping or
out-of-range offsets, ...) naming the file and tensor. Pickle checkpoints are refused, never loaded.

Tensors are then read through ``np.memmap`` views rather than ``safe_open(...).get_slice``: the loader's
per-device callbacks slice in jalign's layout (e.g. ``q`` as ``[D, H, hd]``, a reshape + transpose of
HF's ``[H*hd, D]``), which a numpy view of the mapped tensor serves directly; ``get_slice`` only slices
in the file's layout, so each layout entry would need its own index translation.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Optional

import ml_dtypes
import numpy as np

from jalign.errors import HFCheckpointError

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's cap on the JSON header (safetensors' MAX_HEADER_SIZE)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1,
                "F8_E5M2FNUZ": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8, "C64": 8}
PICKLE_WEIGHTS = ("*.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _diagnose_safetensors(path: Path, size: int) -> Optional[str]:
    """What is wrong with a file the safetensors library rejected, in words (None: not found here).

    Only reads the header (bounded by the format's cap), never the tensor data.
    """
    if size < 8:
        return f"truncated: {size} bytes, shorter than the 8-byte header length that starts the format"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > SAFETENSORS_MAX_HEADER:
            return (f"the header length field says {n:,} bytes, over the format's {SAFETENSORS_MAX_HEADER:,}-byte "
                    "cap (a corrupt file, or not safetensors)")
        if 8 + n > size:
            return f"truncated: the header length field says {n:,} bytes but only {size - 8:,} follow it"
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"the header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    available, spans = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(x) for x in info["shape"]], info["dtype"]
        except (TypeError, ValueError, KeyError):
            return f"tensor {name}: malformed header entry {info!r}"
        spans.append((begin, stop, name, shape, dtype))
    if spans:
        begin, stop, name, *_ = max(spans, key=lambda t: t[1])
        if stop > available:
            return (f"tensor {name} ends at byte {stop:,} of the data but the file holds only {available:,} "
                    "bytes of data after the header (truncated: an interrupted download or copy?)")
    end, prev = 0, None
    for begin, stop, name, shape, dtype in sorted(spans):
        if stop < begin:
            return f"tensor {name}: data_offsets {[begin, stop]} end before they start"
        if begin < end:
            return (f"tensor {name} (data_offsets {[begin, stop]}) overlaps tensor {prev[2]} "
                    f"(data_offsets {list(prev[:2])})")
        if begin > end:
            return f"a gap of {begin - end:,} bytes before tensor {name}: data_offsets must be contiguous"
        need = math.prod(shape) * _ST_ITEMSIZE.get(dtype, 0)
        if dtype in _ST_ITEMSIZE and stop - begin != need:
            return (f"tensor {name}: data_offsets {[begin, stop]} span {stop - begin:,} bytes but shape {shape} "
                    f"of {dtype} needs {need:,}")
        end, prev = stop, (begin, stop, name)
    if end < available:
        return f"{available - end:,} bytes after the last tensor that the header does not describe"
    return None


def check_safetensors(path: Path) -> None:
    """Raise :class:`HFCheckpointError` naming ``path`` (and the tensor) unless it is a valid file."""
    from safetensors import SafetensorError, safe_open

    try:
        size = path.stat().st_size
    except OSError as e:
        raise HFCheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if size == 0:
        raise HFCheckpointError(f"{path}: not a valid safetensors file: the file is empty (0 bytes)")
    try:
        with safe_open(str(path), framework="numpy"):
            return
    except SafetensorError as e:
        problem = _diagnose_safetensors(path, size) or str(e)
    except OSError as e:
        problem = e.strerror or str(e)
    raise HFCheckpointError(f"{path}: not a valid safetensors file: {problem}")


class SafetensorsFile:
    """One ``.safetensors`` file: header checked by the library, tensors as read-only ``np.memmap``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        check_safetensors(self.path)
        with open(self.path, "rb") as f:  # the library accepted it: the header is bounded and well formed
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self.header, self.data_start = header, 8 + n

    def shape(self, name: str) -> tuple:
        return tuple(self.header[name]["shape"])

    def dtype_problem(self, name: str) -> Optional[str]:
        dtype = self.header[name]["dtype"]
        if dtype in ST_DTYPES:
            return None
        return f"{self.path.name}: tensor {name} has dtype {dtype}, which jalign does not read"

    def array(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in ST_DTYPES:
            raise HFCheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, _ = info["data_offsets"]
        return np.memmap(self.path, dtype=ST_DTYPES[info["dtype"]], mode="r", offset=self.data_start + begin,
                         shape=tuple(info["shape"]))


def _pickle_files(d: Path) -> list[str]:
    return sorted({p.name for pattern in PICKLE_WEIGHTS for p in d.glob(pattern)})


def open_weights(hf_dir) -> dict[str, SafetensorsFile]:
    """{tensor name: file} from model.safetensors or model.safetensors.index.json.

    Every file is validated before any tensor is read; pickle checkpoints are refused, never loaded.
    """
    d = Path(hf_dir)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFCheckpointError(f"{index}: invalid JSON ({e})") from None
        except (KeyError, TypeError):
            raise HFCheckpointError(f"{index}: missing key 'weight_map'") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise HFCheckpointError(f"{index}: weight_map must map tensor names to file names")
        files = {}
        for fname in sorted(set(weight_map.values())):
            if not (d / fname).is_file():
                raise HFCheckpointError(f"{index}: lists {fname}, which is missing from {d}")
            files[fname] = SafetensorsFile(d / fname)
        for name, fname in weight_map.items():
            if name not in files[fname].header:
                raise HFCheckpointError(f"{index}: lists tensor {name} in {fname}, which does not contain it")
        return {name: files[f] for name, f in weight_map.items()}
    single = d / "model.safetensors"
    if single.is_file():
        f = SafetensorsFile(single)
        return {name: f for name in f.header}
    pickles = _pickle_files(d)
    if pickles:
        raise HFCheckpointError(
            f"{d}: only pickle weights ({', '.join(pickles)}); jalign reads safetensors only and never unpickles "
            "(a pickle can run code). Convert once in a trusted environment, e.g. "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)")
    other = sorted(p.name for p in d.glob("*.safetensors"))
    raise HFCheckpointError(f"{d}: missing weights: no model.safetensors or model.safetensors.index.json"
                            + (f" (found {', '.join(other)}, not listed by an index)" if other else ""))
