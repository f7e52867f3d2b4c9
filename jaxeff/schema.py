"""Base class of every config section (unknown keys are errors, values are immutable) and the
one-line error messages shared by every YAML file we read (experiment configs, merge recipes).
Light to import: pydantic and PyYAML only."""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from jaxeff.errors import ConfigError


class Section(BaseModel):
    # inf / nan are never a meaningful setting (a learning rate of .inf trains to NaN)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def validation_message(err: ValidationError, root: str) -> str:
    """The first validation error as one line naming its dotted location (``root`` when the
    error is about the whole document)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or root
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{loc}: unknown key"
    if first["type"] == "missing":
        return f"{loc}: missing (required)"
    msg = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    if isinstance(given, (dict, list)) or given is None:
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {given!r})"


def read_yaml(path, what: str) -> Any:
    """The parsed YAML file ``path``; a missing file or invalid YAML is a one-line
    :class:`ConfigError` that starts with ``what`` (e.g. "config file") and the path."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} '{p}' is a folder (expected a YAML file)")
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' does not exist")
    try:
        data = p.read_bytes()
        return yaml.safe_load(data.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{what} '{p}': cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{p}': not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} '{p}': invalid YAML{where}: {problem}") from None
