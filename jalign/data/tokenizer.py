"""Tokenizers with one small interface: the built-in byte tokenizer and Hugging Face ``tokenizer.json``.

Both expose ``encode(text, add_special=False)``, ``decode(ids, skip_special=True)``, ``token_to_id``,
and the attributes the data pipeline and generation need: ``vocab_size``, ``pad_id``, ``bos_id``,
``eos_id``, ``eos_ids`` (every id that ends a generation), ``special_ids``, ``add_bos`` (prepend BOS to
a prompt), ``bos_token`` / ``eos_token`` (strings, for chat templates) and ``chat_template``.

    tok = load_tokenizer("byte")                       # tiny default model (vocab_size 384)
    tok = load_tokenizer("/models/Llama-3-8B-Instruct")  # directory with tokenizer.json
    tok = load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")   # a Hub name (tokenizer files via huggingface_hub's cache)
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from jalign.errors import TokenizerError  # noqa: F401  (re-exported: jalign.data.tokenizer.TokenizerError)

# Role and control tokens of the byte tokenizer. Order fixes their ids (0..len-1); ids below
# BYTE_OFFSET that are not listed are reserved so new specials never shift the byte ids.
BYTE_SPECIAL_TOKENS = (
    "<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)
BYTE_OFFSET = 16


class ByteTokenizer:
    """UTF-8 bytes at ids ``BYTE_OFFSET + b`` plus a few special tokens (vocab 272 <= 384).

    Special tokens written in text (e.g. ``"<|user|>"``) are recognised as single tokens, so chat
    templates are plain strings. ``pad_id=0, bos_id=1, eos_id=2``.
    """

    chat_template: Optional[str] = None  # the "tiny" template in jalign.data.chat is its native one

    def __init__(self):
        self._special = {tok: i for i, tok in enumerate(BYTE_SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self._special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in BYTE_SPECIAL_TOKENS) + ")")
        self.vocab_size = BYTE_OFFSET + 256
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.pad_token, self.bos_token, self.eos_token = BYTE_SPECIAL_TOKENS[:3]
        self.eos_ids = frozenset({self.eos_id})
        self.special_ids = frozenset(self._special.values())
        self.add_bos = True
        self.id_limit = self.vocab_size  # every id encode() can return is below this

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Bytes of ``text`` with special-token strings mapped to their ids; BOS first if asked."""
        ids = [self.bos_id] if add_special else []
        for piece in self._split.split(text):
            if piece in self._special:
                ids.append(self._special[piece])
            elif piece:
                ids.extend(b + BYTE_OFFSET for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                buf.append(i - BYTE_OFFSET)
                continue
            out.append(buf.decode("utf-8", errors="replace"))  # flush bytes before a special token
            buf = bytearray()
            if not skip_special:
                # ids past the byte range exist when model.vocab_size > tokenizer.vocab_size (padding)
                out.append(self._special_by_id.get(i, f"<|reserved_{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._special:
            return self._special[token]
        b = token.encode("utf-8")
        return b[0] + BYTE_OFFSET if len(b) == 1 else None

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


def _token_str(value: Any) -> Optional[str]:
    """tokenizer_config stores special tokens as strings or serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_chat_template(directory: Path, config: dict) -> tuple[Optional[str], Optional[Path]]:
    """(template, the file it is in). Newer transformers save ``chat_template.jinja`` beside the
    config; older ones inline it in tokenizer_config.json."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), jinja_file
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja_file}: not a text (UTF-8) file ({e})") from None
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str):
        return tpl, directory / "tokenizer_config.json"
    return None, None


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizer.json``) read with the ``tokenizers`` library.

    Only data files are read (``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``,
    ``chat_template.jinja``); no Python from the model repository is ever run.
    """

    def __init__(self, tokenizer_json: str | Path):
        from tokenizers import Tokenizer

        path = Path(tokenizer_json)
        directory = path.parent
        self.path = path
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for a malformed file
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = _read_json(directory / "tokenizer_config.json")
        gen_config = _read_json(directory / "generation_config.json")

        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.id_limit = max(vocab.values(), default=-1) + 1  # ids need not be contiguous
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)

        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        for key in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, key)
            if token is not None and self._tok.token_to_id(token) is None:
                raise TokenizerError(f"{directory / 'tokenizer_config.json'}: {key} {token!r} is not in the "
                                     f"vocabulary of {path}")
        self.bos_id = self._id_or_none(self.bos_token)
        self.eos_id = self._id_or_none(self.eos_token)
        eos_ids = gen_config.get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids
        if eos_ids is not None and not (isinstance(eos_ids, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.id_limit for i in eos_ids)):
            raise TokenizerError(f"{directory / 'generation_config.json'}: eos_token_id={eos_ids!r}: expected "
                                 f"token ids below {self.id_limit}")
        eos_ids = list(eos_ids or [])
        if self.eos_id is None and eos_ids:  # some repos only name eos in generation_config
            self.eos_id = eos_ids[0]
            self.eos_token = self._tok.id_to_token(self.eos_id)
        self.eos_ids = frozenset(i for i in [self.eos_id, *eos_ids] if i is not None)
        # Padding is always masked out, so any valid id works; eos is the usual fallback.
        pad = self._id_or_none(self.pad_token)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

        # BOS: the legacy Llama flag, else whatever the tokenizer.json post-processor does.
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"]) and self.bos_id is not None
        else:
            probe = self._tok.encode("a", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        self.chat_template, self.chat_template_file = _read_chat_template(directory, config)

    def _id_or_none(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids; ``add_special`` prepends BOS when this tokenizer uses one (never appends EOS)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str):
    """``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` or a directory holding one -> HF; a Hub
    name ``[hf:]org/name[@revision]`` that is no local path -> the repository's tokenizer files.

    A missing or malformed file raises :class:`TokenizerError` naming it.
    """
    if spec == "byte":
        return ByteTokenizer()
    from jalign import hub

    name = spec[3:] if spec.startswith("hf:") else spec
    if not hub.is_local(name) and hub.parse_name(name) is not None:
        spec = str(hub.resolve_tokenizer(name, where="model.tokenizer"))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(
                f"tokenizer: directory {path} has no tokenizer.json (only fast tokenizers are supported; "
                "convert a slow one with transformers' AutoTokenizer(...).save_pretrained)"
            )
        path = path / "tokenizer.json"
    elif not path.is_file():
        raise TokenizerError(f"tokenizer: {path} does not exist (expected 'byte', a tokenizer.json "
                             "or a directory containing one)")
    return HFTokenizer(path)


def check_vocab(model_vocab_size: int, tokenizer, where: str = "model.vocab_size") -> None:
    """Raise :class:`TokenizerError` if ``tokenizer`` can emit an id the model has no embedding row for.

    ``where`` names the setting in the message (e.g. ``"configs/x.yaml: model.vocab_size"``). A model
    vocabulary larger than the tokenizer's (padding rows, e.g. to a multiple of the tensor-parallel
    size) is fine.
    """
    limit = int(getattr(tokenizer, "id_limit", tokenizer.vocab_size))
    if model_vocab_size < limit:
        raise TokenizerError(
            f"{where}: {model_vocab_size} is smaller than the tokenizer's id range ({limit} ids, {tokenizer!r}); "
            f"ids {model_vocab_size}..{limit - 1} would index past the embedding. Set model.vocab_size >= {limit}")
