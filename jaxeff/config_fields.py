"""What a config accepts (``jaxeff config fields``) and how a config differs from the defaults.

Each key's help is the field's ``description=`` when the schema gives one, else the comment on the
field's line in the section's source (``lr: float = 3e-4  # peak learning rate``), else the
comment line just above it, else the section's docstring's first line for a nested section.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from typing import Any

from pydantic import BaseModel

from jaxeff.errors import ConfigError

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT_LINE = re.compile(r"^\s+#\s*(.*)$")


def _comments(cls: type) -> dict[str, str]:
    """``field -> comment`` from the class source (its own line's comment, else the comment above)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        c = _COMMENT_LINE.match(line)
        if c:
            above.append(c.group(1).strip())
            continue
        m = _FIELD_LINE.match(line)
        if m and m.group(1) in _fields(cls) and m.group(1) not in out:
            text = (m.group(2) or "").strip() or " ".join(above)
            if text:
                out[m.group(1)] = text
        above = []
    return out


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", text).replace("<class '", "").replace("'>", "")


def _default(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
        return "{section}"
    return json.dumps(value if not isinstance(value, tuple) else list(value), default=str)


def _nested(annotation: Any) -> type | None:
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
        return annotation
    return None


class _DataclassField:
    """A dataclass field seen as a pydantic FieldInfo (annotation, description, defaults)."""

    def __init__(self, f: dataclasses.Field, hints: dict):
        from pydantic.fields import FieldInfo

        self.f, self.annotation, self.description = f, hints.get(f.name, f.type), None
        self.info = f.default if isinstance(f.default, FieldInfo) else None
        if self.info is not None:
            self.description = self.info.description

    def is_required(self) -> bool:
        if self.info is not None:
            return self.info.is_required()
        return self.f.default is dataclasses.MISSING and self.f.default_factory is dataclasses.MISSING

    def get_default(self, call_default_factory: bool = True):
        if self.info is not None:
            return self.info.get_default(call_default_factory=True)
        return self.f.default if self.f.default is not dataclasses.MISSING else self.f.default_factory()


def _fields(cls: type) -> dict:
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: _DataclassField(f, hints) for f in dataclasses.fields(cls) if f.init}
    return dict(getattr(cls, "model_fields", {}))


def field_rows(cls: type, section: str | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(dotted key, type, default, help)`` for every key of ``cls`` (or of its section
    ``section``, dotted), depth-first in declaration order."""
    if section:
        node = cls
        for part in section.split("."):
            fields = _fields(node)
            sub = _nested(fields[part].annotation) if part in fields else None
            if sub is None:
                keys = ", ".join(k for k, f in fields.items() if _nested(f.annotation))
                raise ConfigError(f"config fields: '{section}' is not a section (expected one of {keys})")
            node = sub
        return field_rows(node, None, section + ".")
    rows = []
    notes = _comments(cls)
    for name, field in _fields(cls).items():
        sub = _nested(field.annotation)
        help_ = field.description or notes.get(name, "")
        if sub is not None:
            doc = (inspect.getdoc(sub) or "").split("\n")[0] if sub.__doc__ else ""
            rows.append((prefix + name, "section", "", help_ or doc))
            rows += field_rows(sub, None, prefix + name + ".")
        else:
            rows.append((prefix + name, _type_name(field.annotation), _default(field), help_))
    return rows


def changed_keys(tree: dict, defaults: dict) -> dict:
    """The entries of ``tree`` that differ from ``defaults`` (nested mappings kept as mappings)."""
    out = {}
    for k, v in tree.items():
        d = defaults.get(k, object()) if isinstance(defaults, dict) else object()
        if isinstance(v, dict) and isinstance(d, dict):
            sub = changed_keys(v, d)
            if sub:
                out[k] = sub
        elif v != d:
            out[k] = v
    return out


__all__ = ["field_rows", "changed_keys"]
