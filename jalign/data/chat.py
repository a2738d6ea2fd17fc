"""Chat templates and the prompt/response split that decides which tokens carry loss.

Templates (``data.chat_template`` in the config):

* ``"auto"``  (the default) the tokenizer's own template when it has one (``"hf"``), ``"tiny"`` for the
  built-in byte tokenizer, else ``"none"``; :func:`describe_template` says which one that is.
* ``"tiny"``  built in, for the byte tokenizer: ``<|user|>37+48=<|assistant|>85<|eos|>``
  (each turn is ``<|role|>content``; an assistant turn ends with the EOS token).
* ``"none"``  raw concatenation of the contents (base models, completion-style data).
* ``"hf"``    the tokenizer's own ``chat_template`` (tokenizer_config.json / chat_template.jinja),
  rendered with jinja2 exactly as ``transformers``' ``apply_chat_template`` does.
* a path to a ``.jinja`` file, rendered the same way.

Loss goes only on response tokens. For a conversation the rendering is done incrementally and the
prefixes diffed (as TRL does): the text added by rendering assistant turn *i* after the generation
prompt of turns ``[:i]`` is response; everything else is prompt. Pieces are tokenized separately, so
the boundary never depends on BPE merges across it.

A template that cannot be read, has a syntax error, refuses a conversation (``raise_exception``),
breaks the sandbox or fails while rendering raises :class:`ChatTemplateError` naming the template
(file, and line where jinja knows it) and what happened.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from jalign.errors import ChatTemplateError, TokenizerError  # noqa: F401  (re-exported here)

Message = dict  # {"role": str, "content": str}
Prompt = Union[str, Sequence[Message]]
NAMED_TEMPLATES = ("auto", "tiny", "none", "hf")


@functools.lru_cache(maxsize=16)
def compile_jinja(source: str):
    """Compile a chat template the way ``transformers.utils.chat_template_utils`` does.

    Sandboxed (templates come from model repositories and are untrusted), ``trim_blocks`` and
    ``lstrip_blocks``, loop controls, and the same helpers: ``raise_exception``, ``strftime_now`` and a
    ``tojson`` that does not HTML-escape. ``{% generation %}`` blocks are accepted and render as-is.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers uses {% generation %} to find assistant tokens; we diff prefixes instead.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateRaised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class ChatTemplate:
    """``render(messages, add_generation_prompt) -> str`` plus how to tokenize the result.

    ``prepend_bos``: whether token ids get the tokenizer's BOS in front. False for jinja templates,
    which write ``{{ bos_token }}`` themselves (transformers tokenizes them without special tokens).
    """

    def __init__(self, name: str, render: Callable[[Sequence[Message], bool], str], prepend_bos: bool):
        self.name, self._render, self.prepend_bos = name, render, prepend_bos

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


class TemplateRaised(Exception):
    """What the template's own ``raise_exception(message)`` raises (it refuses the input)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _template_line(tb) -> Optional[int]:
    """The template line a rendering error happened at (jinja maps its frames to ``<template>``)."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _compile(name: str, source: str):
    import jinja2

    try:
        return compile_jinja(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template {name}: line {e.lineno}: syntax error: {e.message}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template {name}: cannot compile: {e}") from None


def _jinja_template(name: str, source: str, tokenizer) -> ChatTemplate:
    import jinja2
    from jinja2.sandbox import SecurityError

    compiled = _compile(name, source)
    # transformers passes tokenizer.special_tokens_map: every special token that is set, as a string.
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    specials = {k: v for k, v in specials.items() if v is not None}

    def render(messages, add_generation_prompt):
        try:
            return compiled.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **specials)
        except Exception as e:  # the template is user input: whatever it raises is its error
            line = _template_line(e.__traceback__)
            at = f": line {line}:" if line else ":"
            roles = [m.get("role") for m in messages]
            if isinstance(e, TemplateRaised):
                what = f"refuses the conversation (roles {roles}): {e.message}"
            elif isinstance(e, SecurityError):
                what = f"was stopped by the sandbox: {e}"
            elif isinstance(e, jinja2.TemplateError):
                what = f"failed (roles {roles}): {e}"
            else:
                what = f"failed (roles {roles}): {type(e).__name__}: {e}"
            raise ChatTemplateError(f"chat template {name}{at} {what}") from None

    return ChatTemplate(name, render, prepend_bos=False)


def _hf_label(tokenizer) -> str:
    where = getattr(tokenizer, "chat_template_file", None)
    if where is None:
        return "hf"
    return f"hf (chat_template in {where})" if str(where).endswith(".json") else f"hf ({where})"


def resolve_template_name(template: str, tokenizer) -> str:
    """The template ``"auto"`` stands for with this tokenizer (other names unchanged)."""
    if template != "auto":
        return template
    from jalign.data.tokenizer import ByteTokenizer

    if getattr(tokenizer, "chat_template", None):
        return "hf"
    return "tiny" if isinstance(tokenizer, ByteTokenizer) else "none"


def describe_template(template: str, tokenizer) -> str:
    """One line saying which template a config's ``data.chat_template`` means, for the run's log."""
    name = resolve_template_name(template, tokenizer)
    if name == "hf":
        what = f"{_hf_label(tokenizer)}: the tokenizer's own"
    elif name == "tiny":
        what = "tiny (built in: <|role|>content turns)"
    elif name == "none":
        what = "none (contents concatenated, no chat markup)"
    else:
        what = f"{name} (jinja file)"
    if template == "auto":
        reason = ("the tokenizer has one" if name == "hf" else
                  "the byte tokenizer" if name == "tiny" else "the tokenizer has no chat template")
        return f"chat template: {what} [data.chat_template=auto: {reason}]"
    return f"chat template: {what}"


def get_template(template: str, tokenizer) -> ChatTemplate:
    """Resolve a config name (``auto``, ``tiny``, ``none``, ``hf``) or a jinja file path to a template."""
    if isinstance(template, ChatTemplate):
        return template
    template = resolve_template_name(template, tokenizer)
    if template == "tiny":
        eos = tokenizer.eos_token

        def render(messages, add_generation_prompt):
            text = "".join(f"<|{m['role']}|>{m['content']}" + (eos if m["role"] == "assistant" else "")
                           for m in messages)
            return text + ("<|assistant|>" if add_generation_prompt else "")

        return ChatTemplate("tiny", render, prepend_bos=tokenizer.add_bos)
    if template == "none":
        return ChatTemplate("none", lambda msgs, _: "".join(m["content"] for m in msgs),
                            prepend_bos=tokenizer.add_bos)
    if template == "hf":
        source = getattr(tokenizer, "chat_template", None)
        if not source:
            raise ChatTemplateError(f"chat_template 'hf': tokenizer {tokenizer!r} has no chat_template "
                                    "(tokenizer_config.json / chat_template.jinja); use 'none' or a .jinja file")
        return _jinja_template(_hf_label(tokenizer), source, tokenizer)
    path = Path(template).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"chat_template: {template!r} is neither {', '.join(map(repr, NAMED_TEMPLATES))} "
                                f"nor an existing jinja file ({path} not found)")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"chat template {path}: cannot read ({e})") from None
    return _jinja_template(str(path), source, tokenizer)


def as_messages(prompt: Prompt, role: str = "user") -> list[Message]:
    """A plain string becomes one message of ``role``; a message list is copied."""
    if isinstance(prompt, str):
        return [{"role": role, "content": prompt}]
    return [dict(m) for m in prompt]


def render_prompt(prompt: Prompt, template, tokenizer) -> str:
    """The text a model is conditioned on: the messages plus the assistant generation prompt."""
    tpl = get_template(template, tokenizer)
    if tpl.name == "none" and isinstance(prompt, str):
        return prompt
    return tpl.render(as_messages(prompt), add_generation_prompt=True)


def _tokenize(text: str, tpl: ChatTemplate, tokenizer, first: bool) -> list[int]:
    ids = tokenizer.encode(text, add_special=False)
    if first and tpl.prepend_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id, *ids]
    return ids


def _end_with_eos(ids: list[int], tokenizer) -> list[int]:
    # A response must teach the model to stop. Chat templates usually end an assistant turn with a
    # token that generation_config lists as EOS (<|eot_id|>, <|im_end|>); add EOS only if none is there.
    if any(i in tokenizer.eos_ids for i in ids):
        return ids
    if tokenizer.eos_id is None:
        raise TokenizerError(f"{tokenizer!r} has no EOS token (neither eos_token in tokenizer_config.json nor "
                             "eos_token_id in generation_config.json), so a response cannot be taught to end")
    return [*ids, tokenizer.eos_id]


def encode_prompt(prompt: Prompt, template, tokenizer) -> list[int]:
    """Prompt token ids (with BOS where the template/tokenizer wants it), ready for generation."""
    tpl = get_template(template, tokenizer)
    return _tokenize(render_prompt(prompt, tpl, tokenizer), tpl, tokenizer, first=True)


def _split_pieces(messages: Sequence[Message], tpl: ChatTemplate) -> list[tuple[str, bool]]:
    """Cut the full rendering into (text, is_response) pieces by diffing incremental renderings."""
    full = tpl.render(messages, add_generation_prompt=False)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tpl.render(messages[:i], add_generation_prompt=True)
        upto = tpl.render(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
            raise ChatTemplateError(
                f"chat template {tpl.name!r} is not prefix-stable at message {i} (rendering the "
                "conversation up to this turn is not a prefix of the full rendering, e.g. a template "
                "that drops earlier reasoning); cannot tell which tokens are the assistant's")
        pieces += [(full[pos:len(before)], False), (upto[len(before):], True)]
        pos = len(upto)
    pieces.append((full[pos:], False))
    return [(t, r) for t, r in pieces if t]


def encode_conversation(messages: Sequence[Message], template, tokenizer) -> tuple[list[int], list[int]]:
    """``(ids, response_mask)`` for a whole conversation; mask 1 on every assistant-turn token.

    Each assistant turn ends with an EOS id (added if the template did not supply one). Content after
    the last assistant turn (rare) stays prompt.
    """
    tpl = get_template(template, tokenizer)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant message, so nothing to train on")
    ids, mask = [], []
    for text, is_response in _split_pieces(list(messages), tpl):
        piece = _tokenize(text, tpl, tokenizer, first=not ids)
        if is_response:
            piece = _end_with_eos(piece, tokenizer)
        ids += piece
        mask += [int(is_response)] * len(piece)
    return ids, mask


def encode_pair(prompt: Prompt, response: Union[str, Sequence[Message]], template,
                tokenizer) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)``: loss goes on ``response_ids`` only (they end with EOS).

    ``response`` is a string (one assistant turn) or a message list continuing ``prompt`` (as in
    preference data where chosen/rejected are conversations). In the latter case prompt_ids cover
    everything up to the last assistant turn's generation prompt; earlier assistant turns are prompt.
    """
    tpl = get_template(template, tokenizer)
    if tpl.name == "none" and isinstance(prompt, str) and isinstance(response, str):
        return _tokenize(prompt, tpl, tokenizer, first=True), _end_with_eos(
            _tokenize(response, tpl, tokenizer, first=False), tokenizer)
    messages = as_messages(prompt) + as_messages(response, role="assistant")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("response has no assistant message")
    before = tpl.render(messages[:last], add_generation_prompt=True)
    upto = tpl.render(messages[: last + 1], add_generation_prompt=False)
    if not upto.startswith(before):
        raise ChatTemplateError(f"chat template {tpl.name!r}: the rendered prompt is not a prefix of "
                                "prompt + response; cannot split the response off")
    prompt_ids = _tokenize(before, tpl, tokenizer, first=True)
    response_ids = _end_with_eos(_tokenize(upto[len(before):], tpl, tokenizer, first=False), tokenizer)
    return prompt_ids, response_ids
