"""argparse flags generated from the typed config, so the CLI and the manifest can never disagree."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import ValidationError

from dreambooth_api.config import CommonConfig, ConfigError, from_validation_error, nearest


def _int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _bool_value(text: str) -> bool:
    """A value for a flag that defaults to true (the SDXL script's --prodigy_decouple ...): true/false, 1/0."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse keyword arguments for one field type."""
    if annotation is bool:
        return {"action": "store_true"}
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _flag_kwargs(inner[0])
        if int in inner and any(typing.get_origin(a) is Literal for a in inner):
            return {"type": _int_or_auto}
        return {"type": str}
    if origin is Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin is list:
        return {"nargs": "+", "type": str}
    if annotation in (int, float, str):
        return {"type": annotation}
    return {"type": str}


def build_parser(model: type[CommonConfig], prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"DreamBooth {model.method} training with {model.script}'s flags and defaults. "
        "Paths may be local or s3:// URIs.",
    )
    for name, info in model.model_fields.items():
        kwargs = _flag_kwargs(info.annotation)
        if kwargs.get("action") == "store_true" and info.default is None:
            # Unset means "decide for me" (--adam_fused): the bare flag is true, and false must be sayable.
            kwargs = {"type": _bool_value, "nargs": "?", "const": True, "metavar": "{true,false}"}
        if kwargs.get("action") == "store_true" and info.default is True:
            # A switch that is on already cannot be a store_true flag: it takes a value (--prodigy_decouple false).
            # The script's type=bool reads any non-empty text, "False" included, as true; this one means it.
            kwargs = {"type": _bool_value, "metavar": "{true,false}"}
        help_text = info.description or ""
        if kwargs.get("action") != "store_true":
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            help_text += f" (default: {default})"
        parser.add_argument(
            f"--{name}", dest=name, required=info.is_required(), default=argparse.SUPPRESS, help=help_text, **kwargs
        )
    return parser


def parse_cli(model: type[CommonConfig], argv: list[str], prog: str) -> CommonConfig:
    """Parse flags into a validated config; bad values raise ConfigError naming the flag and manifest field."""
    parser = build_parser(model, prog)
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_suggestions(unknown, model)}")
    try:
        return model.model_validate(vars(ns))
    except ValidationError as exc:
        raise from_validation_error(exc, model) from None


def _suggestions(unknown: list[str], model: type[CommonConfig]) -> str:
    """' (did you mean --rank?)' for misspelt flags: the scripts have ~70 flags and one typo is the usual cause."""
    flags = [f"--{name}" for name in model.model_fields]
    hints = []
    for flag in (token.split("=", 1)[0] for token in unknown if token.startswith("--")):
        close = nearest(flag, flags)
        hints += [f"{flag} -> {close}"] if close else []
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


__all__ = ["ConfigError", "build_parser", "parse_cli"]
