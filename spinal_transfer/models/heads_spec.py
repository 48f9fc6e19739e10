"""Head specs: one short text names a head and its shape, e.g. on `compare --heads`. Parsed here and only here.

Why a text form: comparing heads means naming several in one command line, and a TrainConfig can hold only
one. A spec is the head kind, optionally followed by `:` and comma-separated options (`:` works between
options too); for the spinal head the first option may be a bare preset name:

    linear                         the backbone's features straight to the classes
    mlp                            hidden layers of mlp_hidden (default 4096, 4096), dropout 0.5
    mlp:hidden=1024                one hidden layer of 1024
    mlp:hidden=1024-512,dropout=0.2   two hidden layers (widths joined by '-')
    spinal                         SpinalNet head with the config's preset (default resnet: no dropout, no BN)
    spinal:vgg                     the paper's VGG preset: dropout 0.5 and batch norm
    spinal:width=256,layers=6      layer width 256, 6 spinal layers
    spinal:vgg,width=1024,splits=4,shared=true,dropout=0.3

| kind   | option  | TrainConfig field | value |
|--------|---------|-------------------|-------|
| spinal | preset  | head_preset       | resnet or vgg (also as the bare first option) |
| spinal | width   | layer_width       | integer >= 1 |
| spinal | layers  | num_layers        | integer >= 1 |
| spinal | splits  | num_splits        | integer >= 1 |
| spinal | shared  | shared_weights    | true or false |
| spinal | dropout | head_dropout      | number in [0, 0.99] |
| mlp    | hidden  | mlp_hidden        | integers >= 1 joined by '-' |
| mlp    | dropout | head_dropout      | number in [0, 0.99] |

Options not named keep the value of the rest of the configuration (flags or recipe). Every value is checked
with the TrainConfig field's own rules; a bad spec is a `HeadSpecError` naming the spec and what is wrong.
This module imports no torch (the command line's help shows the grammar).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..config import CONFIG_FIELDS, check_value
from ..errors import ConfigError

KINDS: tuple[str, ...] = tuple(CONFIG_FIELDS["head"].metadata["choices"])
PRESETS: tuple[str, ...] = tuple(CONFIG_FIELDS["head_preset"].metadata["choices"])
LIST_SEPARATOR = "-"


class HeadSpecError(ConfigError):
    """A head spec that cannot be read; the message names the spec and the fix."""


def _integer(text: str) -> int:
    if not re.fullmatch(r"-?\d+", text):       # -3 is an integer: the field's own range check says what fits
        raise ValueError("an integer")
    return int(text)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("a number") from None


def _boolean(text: str) -> bool:
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError("true or false")
    return value


def _widths(text: str) -> list[int]:
    try:
        return [_integer(t) for t in text.split(LIST_SEPARATOR)]
    except ValueError:
        raise ValueError(f"integers joined by '{LIST_SEPARATOR}' (e.g. 1024{LIST_SEPARATOR}512)") from None


def _preset(text: str) -> str:
    if text not in PRESETS:
        raise ValueError(" or ".join(PRESETS))
    return text


# kind -> option -> (TrainConfig field, reader of the text)
OPTIONS: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {
    "linear": {},
    "mlp": {"hidden": ("mlp_hidden", _widths), "dropout": ("head_dropout", _number)},
    "spinal": {"preset": ("head_preset", _preset), "width": ("layer_width", _integer),
               "layers": ("num_layers", _integer), "splits": ("num_splits", _integer),
               "shared": ("shared_weights", _boolean), "dropout": ("head_dropout", _number)},
}


@dataclass(frozen=True)
class HeadSpec:
    """A parsed spec: its canonical text (the label in tables), the head kind, and the TrainConfig fields it
    sets (always `head`, plus the options given)."""

    text: str
    kind: str
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def slug(self) -> str:
        """A folder name for the spec's runs: `spinal:vgg,width=256` -> `spinal_vgg_width256`."""
        return re.sub(r"[^A-Za-z0-9_.-]", "", self.text.replace(":", "_").replace(",", "_").replace("=", ""))

    def config_fields(self) -> dict:
        """The TrainConfig fields this head sets, ready for `resolve_config` flags."""
        return {"head": self.kind, **self.options}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return LIST_SEPARATOR.join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_head_spec(spec: str) -> HeadSpec:
    """`KIND[:OPTION,...]` -> HeadSpec (module docstring); HeadSpecError for anything else."""
    text = "".join(str(spec).split())
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise HeadSpecError(f"head spec {spec!r}: unknown head kind {kind!r}; a spec starts with one of "
                            f"{', '.join(KINDS)} (e.g. spinal:width=256,layers=6)")
    table = OPTIONS[kind]
    values: dict[str, Any] = {}
    items = re.split(r"[:,]", rest) if rest else []
    takes = f"{kind} takes {', '.join(table)}" if table else f"{kind} takes no options"
    for n, item in enumerate(items):
        key, eq, raw = item.partition("=")
        if not eq and n == 0 and "preset" in table and item in PRESETS:        # spinal:vgg
            key, eq, raw = "preset", "=", item
        if not eq or not key or not raw:
            what = ("needs a value" if key in table else
                    f"is neither a preset ({' or '.join(PRESETS)}) nor an option=value pair"
                    if "preset" in table and n == 0 and not eq else "is not an option=value pair")
            raise HeadSpecError(f"head spec {spec!r}: {item!r} {what}; {takes}")
        if key not in table:
            raise HeadSpecError(f"head spec {spec!r}: unknown option {key!r} for a {kind} head; {takes}")
        if key in values:
            raise HeadSpecError(f"head spec {spec!r}: option {key!r} is given twice")
        name, read = table[key]
        try:
            values[key] = check_value(name, read(raw))
        except ValueError as e:      # a reader's "what it should be", or the field's own check
            detail = "is " + str(e).split(" is ", 1)[1] if isinstance(e, ConfigError) else f"is not {e}"
            raise HeadSpecError(f"head spec {spec!r}: {key}={raw} {detail}") from None
    canon = kind
    if "preset" in values:
        canon += f":{values['preset']}"
    rest_items = [f"{k}={_format(v)}" for k, v in values.items() if k != "preset"]
    if rest_items:
        canon += ("," if "preset" in values else ":") + ",".join(rest_items)
    return HeadSpec(canon, kind, {table[k][0]: v for k, v in values.items()})


def parse_head_specs(specs: Sequence[str]) -> list[HeadSpec]:
    """Several specs, the first being the reference; the same spec twice is refused (its runs would share a
    folder). Two specs that mean the same head in a given config are caught later, against that config."""
    heads = [parse_head_spec(s) for s in specs]
    seen: dict[str, str] = {}
    for given, h in zip(specs, heads):
        if h.slug in seen:
            raise HeadSpecError(f"head specs {seen[h.slug]!r} and {given!r} name the same head; give each once")
        seen[h.slug] = given
    return heads
