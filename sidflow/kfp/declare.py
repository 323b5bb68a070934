"""KFP component and pipeline functions generated from the stage config dataclasses.

Each run parameter is declared once, as a field of its stage's dataclass (name, type, default, help). KFP reads an
interface from a Python signature and its `Args:` docstring, and ships a component function's source text into the
container; so the functions here are written as source text from the fields and compiled with that text registered
in linecache (where inspect.getsource, which the KFP compiler calls, finds it). A generated body only hands its
arguments on: `sidflow.kfp.tasks.<name>(**arguments)` in a component, a DAG builder in a pipeline.
"""

import dataclasses
import linecache
import textwrap
import types
import typing
from typing import Any, Callable, Literal

from sidflow.config import default, required


@dataclasses.dataclass(frozen=True)
class Param:
    """One KFP parameter: its name, Python type, default (REQUIRED for none) and description."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple | None = None  # a Literal field's values (KFP declares only their type)
    required: bool = False  # the field's `required`: a run cannot do without a value (submit checks)


REQUIRED = object()  # a parameter without a default (a component's artifact outputs, an input from another task)


def kfp_type(tp: Any) -> Any:
    """Return the type KFP declares for a field type: a Literal's value type, Optional[T] for `T | None`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return type(args[0])
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return typing.Optional[kfp_type(inner)]
    return tp


def params(cls, skip: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> list[Param]:
    """Return the Params of a config dataclass's fields, `skip` left out, names mapped through `rename`."""
    hints = typing.get_type_hints(cls)
    return [Param((rename or {}).get(f.name, f.name), kfp_type(hints[f.name]), default(f), f.metadata["help"],
                  typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None,
                  required(f))
            for f in dataclasses.fields(cls) if f.name not in skip]


def none_fields(cls) -> tuple[str, ...]:
    """Return the names of cls's fields that default to None: they travel in a task's `overrides` dict."""
    return tuple(f.name for f in dataclasses.fields(cls) if default(f) is None)


def _annotation(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"Optional[{_annotation(inner)}]"
    return tp if isinstance(tp, str) else tp.__name__


def _doc(summary: str, ps: list[Param]) -> str:
    lines = [summary, "", "Args:"]
    for p in ps:
        lines += textwrap.wrap(f"{p.name}: {p.help}", 110, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


def source(name: str, ps: list[Param], summary: str, body: str, returns: str | None = None) -> str:
    """Return the source text of `def name(<ps>) -> returns:` with an Args docstring and `body`, which sees the
    arguments as the dict `arguments`."""
    args = []
    for p in ps:
        text = f"{p.name}: {_annotation(p.type)}"
        args.append(text if p.default is REQUIRED else f"{text} = {p.default!r}")
    doc = textwrap.indent(_doc(summary, ps), "    ").lstrip()
    head = f"def {name}({', '.join(args)})" + (f" -> {returns}" if returns else "") + ":"
    return "\n".join([head, f'    """{doc}\n    """', "    arguments = dict(locals())",
                      textwrap.indent(textwrap.dedent(body).strip(), "    "), ""])


def function(name: str, text: str, namespace: dict[str, Any]) -> Callable:
    """Compile `text` (from `source`) and return the function it defines; its source stays readable."""
    filename = f"<sidflow.kfp.declare {name}>"
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    scope: dict[str, Any] = {"Optional": typing.Optional, **namespace}
    exec(compile(text, filename, "exec"), scope)  # noqa: S102  (text built above from the dataclass fields)
    fn = scope[name]
    fn.__module__ = namespace.get("__name__", __name__)
    return fn
