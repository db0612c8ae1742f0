"""Bad input as one line: the failure wrapper of ``mla_analysis.run`` (exit 2, nothing written).

Bad input is a config value (``ConfigError``, an OmegaConf validation error, a Hydra compose error) or a file
or asset that is missing or unreadable (``ResultsError``, which ``CheckpointError`` is, and ``AssetError``).
The message is built from the exception's fields (key, node type, options), not from its wording.
Anything else is a bug or a failure of the run itself and is re-raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import sys
import typing
from typing import Any, Iterator, Optional

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError
from omegaconf.nodes import BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode

from ..assets import AssetError
from ..config import ConfigError
from ..training.results import ResultsError

BAD_INPUT = (ConfigError, ResultsError, AssetError, OmegaConfBaseException, ConfigCompositionException,
             MissingConfigException, OverrideParseException)
NODE_TYPES = {IntegerNode: "int", FloatNode: "float", BooleanNode: "bool", StringNode: "str"}


def one_line(exc: BaseException) -> Optional[str]:
    """The one-line message of a bad-input exception, naming the key and what is allowed; None for any other."""
    if isinstance(exc, MissingConfigException):  # an unknown group option: model=nonexistent
        return f"{exc.missing_cfg_file}: no such config (allowed: {', '.join(exc.options or []) or 'see conf/'})"
    if isinstance(exc, (ConfigError, ResultsError, AssetError)):
        return str(exc)
    cause = exc.__cause__ if isinstance(exc, ConfigCompositionException) and exc.__cause__ is not None else exc
    if not isinstance(cause, OmegaConfBaseException):
        return str(cause).splitlines()[0] if isinstance(exc, BAD_INPUT) else None
    key = getattr(cause, "full_key", None)
    msg = str(getattr(cause, "msg", None) or cause).splitlines()[0]
    if not key:
        return f"config: {msg}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):  # a key the schema does not have
        return f"{key}: unknown key (allowed: {_fields(getattr(cause, 'object_type', None))})"
    if isinstance(cause, ValidationError):
        allowed = _allowed(cause)
        if allowed is not None:
            return f"{key}={getattr(cause, 'value', None)!r} is invalid (allowed: {allowed})"
    return f"{key}: {msg}"


def _fields(cls: Any) -> str:
    if isinstance(cls, type) and dataclasses.is_dataclass(cls):
        return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
    return "see mla_analysis/config/"


def _allowed(cause: ValidationError) -> Optional[str]:
    """What a node accepts: a closed choice's values or a value type; None when the exception does not say."""
    node = getattr(cause, "child_node", None)
    if isinstance(node, EnumNode):  # a closed choice (mla_analysis.config.checks.Choice)
        return " | ".join(str(m.value) for m in node.enum_type)
    for kind, name in NODE_TYPES.items():
        if isinstance(node, kind):
            return f"a value of type {name}"
    args = [a for a in typing.get_args(getattr(cause, "ref_type", None)) if a is not type(None)]
    while args and typing.get_origin(args[0]) in (list, dict):  # an element of List[int] / Dict[str, float]
        args = list(typing.get_args(args[0]))[-1:]
    if args and isinstance(args[0], type) and issubclass(args[0], enum.Enum):  # an element of a list of choices
        return " | ".join(str(m.value) for m in args[0])
    return f"a value of type {args[0].__name__}" if args and isinstance(args[0], type) else None


@contextlib.contextmanager
def exit_on_bad_input() -> Iterator[None]:
    """Bad input inside the block ends the process with one line on stderr and exit 2; anything else is re-raised."""
    try:
        yield
    except BAD_INPUT as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
