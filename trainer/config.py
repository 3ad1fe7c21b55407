"""Typed options → command line, config file and ``--help``, validated once.

Each stage's options are a dataclass. A field's docstring (the string literal right under it,
as in litgpt) is its ``--help`` text. Values come from, in increasing precedence: the field
defaults, a ``--config run.yaml|json`` file (keys are field names, ``-`` or ``_``), and the
command line. The dataclass's ``__post_init__`` then validates the whole set once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from trainer.errors import TrainerError

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: ``{field: docstring}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(name: str, tp: Any, value: Any) -> Any:
    """Convert a config-file or command-line value to the field's type, or say why not."""
    base, optional = _unwrap_optional(tp)
    if optional and isinstance(value, str) and value.lower() in {"none", "null"}:
        value = None
    if value is None:
        if optional:
            return None
        raise TrainerError(f"option --{name} needs a value")
    origin = get_origin(base)
    if origin is Literal:
        choices = get_args(base)
        if value not in choices:
            raise TrainerError(f"option --{name}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item,) = get_args(base)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise TrainerError(f"option --{name}: expected a list, got {value!r}")
        return [_convert(name, item, v) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in {"1", "true", "yes", "on"}:
            return True
        if str(value).lower() in {"0", "false", "no", "off"}:
            return False
        raise TrainerError(f"option --{name}: expected true or false, got {value!r}")
    if base in (int, float):
        try:
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return base(value)
        except (TypeError, ValueError):
            raise TrainerError(
                f"option --{name}: expected {'an integer' if base is int else 'a number'}, "
                f"got {value!r}"
            ) from None
    if base is Path:
        return Path(str(value))
    if base is str:
        return str(value)
    raise TypeError(f"unsupported option type {tp!r} for {name}")  # a programming error


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every bad option is one clear line."""

    def error(self, message: str) -> typing.NoReturn:
        raise TrainerError(f"{self.prog}: {message}")


def build_parser(cls: type, prog: str, description: str) -> _Parser:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    parser = _Parser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="YAML or JSON file of options (field names as keys); the command line overrides it",
    )
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )  # type: ignore[misc]
        help_ = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        help_ += " (required)" if default is None and _is_required(cls, f.name) else ""
        help_ += f" [default: {default}]" if default not in (None, [], False) else ""
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif get_origin(tp) is list:
            parser.add_argument(flag, nargs="+", metavar=f.name.upper(), help=help_)
        elif get_origin(tp) is Literal:
            parser.add_argument(flag, choices=list(get_args(tp)), help=help_)
        else:
            parser.add_argument(flag, metavar=f.name.upper(), help=help_)
    return parser


def _is_required(cls: type, name: str) -> bool:
    return name in getattr(cls, "REQUIRED", ())


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TrainerError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise several unrelated types
        raise TrainerError(
            f"config file {path} is not valid {path.suffix[1:] or 'JSON'}: {e}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainerError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_options(cls: type[T], argv: list[str], prog: str, description: str) -> T:
    """Defaults < ``--config`` file < command line, converted to types and validated once."""
    parser = build_parser(cls, prog, description)
    given = vars(parser.parse_args(argv))
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    config = given.pop("config", None)
    if config is not None:
        for key, value in read_config_file(config).items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TrainerError(f"config file {config}: unknown option {key!r}{hint}")
            values[key] = value
    values.update(given)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(k.replace("_", "-"), hints[k], v) for k, v in values.items()}
    for name in getattr(cls, "REQUIRED", ()):
        if kwargs.get(name) is None:
            raise TrainerError(f"{prog}: option --{name.replace('_', '-')} is required")
    return cls(**kwargs)


def options_dict(options: Any) -> dict[str, Any]:
    """A JSON-friendly copy of an options dataclass, for ``run.json``."""
    out: dict[str, Any] = {}
    for k, v in dataclasses.asdict(options).items():
        out[k] = (
            str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v
        )
    return out
