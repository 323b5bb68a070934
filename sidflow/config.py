"""Typed stage configs: one frozen dataclass per stage, overridden through one function.

Every field carries `metadata={"help": ...}`; the CLI flags, the KFP component parameters and the README table
are generated from these, so a parameter has one name and one description everywhere.
"""

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Literal


def param(default: Any, help: str, required: bool = False) -> Any:
    """Return a dataclass field with a default and its help text (unit and source). A `required` field has no usable
    default (a URI the run cannot do without): the CLI help and the docs say so, `submit` refuses a run without it,
    and the stage's validate names it in one line when it is empty."""
    return dataclasses.field(default=default, metadata={"help": help, "required": required})


def required(f: dataclasses.Field) -> bool:
    """Whether a config field must be given (declared with `param(..., required=True)`)."""
    return bool(f.metadata.get("required"))


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Return value converted to type tp (strings from the CLI or `kfp run create`), or raise a one-line ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(name, inner[0], value)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}={value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}={value!r} is not a boolean (true/false)")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be {tp.__name__}, not a boolean")
        try:
            num = (float(value) if tp is int and isinstance(value, str) and any(ch in value.lower() for ch in ".e")
                   else value)  # "2.0", "1e3" -> 2, 1000
            out = tp(num)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name}={value!r} is not a valid {tp.__name__}") from None
        if tp is int and isinstance(num, float) and num != out:  # "2.5" or 2.5 must not truncate to 2
            raise ValueError(f"{name}={value!r} is not an integer")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string")
        return value
    if tp in (dict, list):  # JSON on the command line: --gpu-node-selector '{"key": "value"}'
        kind, given = ("object" if tp is dict else "array"), value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, tp):
            raise ValueError(f"{name}={given!r} is not a JSON {kind}")
        return value
    return value


def default(f: dataclasses.Field) -> Any:
    """Return a field's default, calling its default_factory if it has one (dict and list fields)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def override(cfg, overrides: dict[str, Any] | None = None):
    """Return a copy of `cfg` with overrides applied; unknown keys and wrong types are one-line errors."""
    overrides = {k.replace("-", "_"): v for k, v in (overrides or {}).items()}
    hints = _field_types(type(cfg))
    unknown = sorted(set(overrides) - set(hints))
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} key(s): {', '.join(unknown)}")
    return dataclasses.replace(cfg, **{k: coerce(k, hints[k], v) for k, v in overrides.items()})


def to_dict(cfg) -> dict[str, Any]:
    """Return the config as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def to_json(cfg) -> str:
    """Return the resolved config as indented JSON (written as config.json before any GPU work)."""
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


class BoolFlag(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag` for a bool field; `--flag true|false` still parses (older scripts, and to_args, whose
    output must read back the same), its value coerced like any other."""

    def __init__(self, option_strings, dest, default=None, help=None, **_):
        super().__init__(option_strings, dest, default=default, help=help)
        self.nargs, self.metavar = "?", "true|false"  # the old form's optional value; usage lines show it

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            values = False
        setattr(namespace, self.dest, True if values is None else values)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep epilog examples as written; show a bool field as `--flag, --no-flag`."""

    def _format_action_invocation(self, action):
        if isinstance(action, BoolFlag):
            return ", ".join(action.option_strings)
        return super()._format_action_invocation(action)


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one `--field-name` flag per config field (a `--field-name/--no-field-name` pair for a bool), with the
    field's help and default (values coerced later)."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata.get('help', '')} " + ("(required)" if required(f) else f"(default: {default(f)!r})")
        text = text.replace("%", "%%")  # argparse %-formats help: a literal "30%" would break --help
        if tp is bool:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, action=BoolFlag, help=text)
            continue
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, choices=choices,
                            metavar=None if choices else f.name.upper(), help=text)


def to_args(cfg) -> list[str]:
    """Return the `--field value` flags that reproduce cfg on the sidflow command line (None fields omitted: the
    CLI default stands for them); the inverse of add_arguments + from_args."""
    out = []
    for name, value in to_dict(cfg).items():
        if value is not None:
            text = json.dumps(value) if isinstance(value, (bool, dict, list)) else str(value)
            out += ["--" + name.replace("_", "-"), text]
    return out


def from_args(cls, args: argparse.Namespace, base=None):
    """Return cls (or `base`) overridden with the flags the user actually passed."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return override(base if base is not None else cls(), given)


def markdown_table(cls, own: bool = False) -> str:
    """Return the parameter table of a config class (docs/parameters.md is generated from these); `own`:
    only the fields the class itself declares, not those it inherits (FinetuneConfig's beside DistillConfig's)."""
    rows = ["| parameter | default | meaning |", "|---|---|---|"]
    names = set(cls.__dict__.get("__annotations__", {})) if own else None
    for f in (f for f in dataclasses.fields(cls) if names is None or f.name in names):
        value = "required" if required(f) else f"`{default(f)!r}`"
        meaning = f.metadata.get("help", "").replace("<", "&lt;")  # <name> would render as an HTML tag
        rows.append(f"| `{f.name}` | {value} | {meaning} |")
    return "\n".join(rows)
