"""SteerLM's attribute conditioning (Dong et al. 2023, "SteerLM: Attribute Conditioned SFT as an
(User-Steerable) Alternative to RLHF"): the attribute string and where the chat template renders it.

    values = parse_attribute_values("correctness=4,verbosity=0")     # {"correctness": 4, "verbosity": 0}
    text = attribute_string(values, ["quality", "correctness", "verbosity"])   # "correctness:4,verbosity:0"
    messages = condition_prompt("37+48=", text)   # [{"role": "system", "content": text}, {"role": "user", ...}]
    ids = steered_prompt_ids("37+48=", values, tokenizer, "tiny", order)      # ready for jalign.generate

The attribute string is NeMo-Aligner's ``name:value`` list joined by commas, in the configured order; an
attribute without a value is left out (the model then learned it unconditioned). It is given to the model as a
system message, so any chat template renders it: the tiny one as ``<|system|>correctness:4,verbosity:0``
before the user turn; a prompt that already starts with a system message gets the string appended to it on
a new line. (NeMo-Aligner writes it after the assistant header behind its own ``<extra_id_2>`` label token;
a system message is where every chat template already puts instructions.) No JAX here.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

from jalign.data.chat import as_messages
from jalign.data.pipeline import SFTData
from jalign.errors import ConfigError

MAX_VALUE = 4  # the 0-4 scale of HelpSteer / SteerLM


def parse_attribute_values(text: str, *, where: str = "--attributes") -> dict[str, int]:
    """``"correctness=4,verbosity=0"`` (``name:value`` also accepted) -> ``{"correctness": 4, "verbosity": 0}``."""
    out: dict[str, int] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        sep = "=" if "=" in part else ":"
        name, _, value = part.partition(sep)
        name, value = name.strip(), value.strip()
        if not name or not value:
            raise ConfigError(f"{where}: {part!r} is not name=value (e.g. correctness=4,verbosity=0)")
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{where}: {name}={value!r}: attribute values are integers (0-{MAX_VALUE})") from None
        if name in out:
            raise ConfigError(f"{where}: attribute {name!r} is given twice")
        out[name] = number
    return out


def check_value(name: str, value, max_value: int, where: str) -> Optional[int]:
    """An attribute value as an int in [0, max_value] (None stays None: not given); anything else is an error."""
    if value is None:
        return None
    if float(value) != int(value) or not 0 <= int(value) <= max_value:
        raise ConfigError(f"{where}: attribute {name}={value!r} is not an integer in [0, {max_value}] "
                          "(`jalign annotate` quantises a reward model's values to that scale)")
    return int(value)


def attribute_string(values: Mapping[str, Optional[float]], order: Sequence[str], *, max_value: int = MAX_VALUE,
                     where: str = "attributes") -> str:
    """``name:value`` pairs joined by commas in ``order``; names without a value are left out. A value for a name
    that is not in ``order`` is an error (the model was not trained on it)."""
    unknown = [k for k in values if k not in order]
    if unknown:
        raise ConfigError(f"{where}: unknown attribute(s) {unknown}; this model is conditioned on {list(order)}")
    parts = []
    for name in order:
        v = check_value(name, values.get(name), max_value, where)
        if v is not None:
            parts.append(f"{name}:{v}")
    return ",".join(parts)


def condition_prompt(prompt, attributes: str) -> list:
    """The prompt (a string or message list) as messages with the attribute string in its system message."""
    messages = as_messages(prompt)
    if not attributes:
        return messages
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0], content=f"{messages[0]['content']}\n{attributes}")
        return [first, *messages[1:]]
    return [{"role": "system", "content": attributes}, *messages]


def steered_prompt_ids(prompt, values: Mapping[str, Optional[float]], tokenizer, template,
                       order: Optional[Sequence[str]] = None, *, max_value: int = MAX_VALUE) -> list[int]:
    """Token ids of ``prompt`` conditioned on ``values`` (``order``: the model's attribute list; default the
    order of ``values``), with the assistant generation prompt: the input of ``jalign.generate.generate``."""
    from jalign.data.chat import encode_prompt

    text = attribute_string(values, list(order) if order is not None else list(values), max_value=max_value)
    return encode_prompt(condition_prompt(prompt, text), template, tokenizer)


# ---- the data kind --------------------------------------------------------------------------------
class SteerData(SFTData):
    """Attribute-conditioned SFT data (``{"prompt", "response", "attributes"}`` or a conversation with
    ``"attributes"``): each prompt conditioned on its example's attribute string, loss on the response only,
    rows as in SFT (packing included). ``attributes``: the names and order of the string (None: the training
    data's names, sorted); names the data has beyond them are not rendered."""

    kind = "steer"

    def __init__(self, cfg, tokenizer, *, attributes: Optional[Sequence[str]] = None, max_value: int = MAX_VALUE,
                 **kw):
        self.order = list(attributes) if attributes else None
        self.max_value = max_value
        super().__init__(cfg, tokenizer, **kw)

    def conditioned(self, ex, values: Optional[Mapping] = None) -> list:
        """The example's prompt conditioned on ``values`` (default: its own attributes)."""
        values = ex.attributes if values is None else values
        text = attribute_string({k: v for k, v in values.items() if k in self.order}, self.order,
                                max_value=self.max_value, where=ex.source or "<example>")
        return condition_prompt(ex.prompt, text)

    def _tokenize(self, spec, examples):
        from jalign.data.formats import SFTExample

        if self.order is None:  # the training split comes first
            self.order = sorted({k for ex in examples for k in ex.attributes})
            if not self.order:
                raise ConfigError(f"data.train={spec}: no example has attributes (run `jalign annotate` first)")
        sft = [SFTExample(prompt=self.conditioned(ex), response=ex.response, source=ex.source) for ex in examples]
        return super()._tokenize(spec, sft)

    def _prompt_reference(self, ex):
        return self.conditioned(ex), ex.response

    def steered_eval_examples(self, values: Mapping) -> list[tuple[list[int], str]]:
        """``(prompt_ids, reference)`` of the eval examples, every prompt conditioned on the same ``values``."""
        from jalign.data.chat import encode_prompt

        return [(encode_prompt(self.conditioned(ex, values), self.cfg.data.chat_template, self.tokenizer),
                 ex.response) for ex in self.eval_examples_raw if isinstance(ex.response, str)]
