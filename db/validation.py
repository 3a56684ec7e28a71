"""Checks of the values that callers pass to the store, raising ``InputError``.

The store runs these checks before it opens a transaction. Whether a referenced row exists is
checked inside the transaction, and a missing row raises ``StoreError`` instead.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from os import fspath
from typing import Any, TypeVar

import numpy as np

from annotator.db.models import NAME_LENGTH, BatchKind, ImageStatus, ItemPurpose
from annotator.db.records import ImageRecordLike, NewBatchItem, Prompt
from annotator.errors import InputError

EnumT = TypeVar("EnumT", bound=enum.StrEnum)
T = TypeVar("T")

MAX_LISTED = 10
"""Number of offending values that an error message lists before it counts the rest."""

_HEX_DIGITS = frozenset("0123456789abcdef")


def format_values(values: Iterable[Any]) -> str:
    """Join up to ``MAX_LISTED`` values with commas and count the rest."""
    items = list(values)
    listed = ", ".join(str(value) for value in items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        listed += f" and {len(items) - MAX_LISTED} more"
    return listed


def chunked(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Yield consecutive slices of at most ``size`` values.

    The store binds ids in chunks so that ``IN (...)`` lists stay below the bound-parameter
    limits of SQLite (32,766 since 3.32) and PostgreSQL (65,535).
    """
    for start in range(0, len(values), size):
        yield values[start : start + size]


# ---------------------------------------------------------------------- scalars


def enum_value(enum_type: type[EnumT], value: EnumT | str, description: str) -> str:
    """Convert ``value`` to the string value of a member of ``enum_type``."""
    try:
        return enum_type(value).value
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise InputError(f"invalid {description} {value!r}: expected one of: {allowed}") from None


def check_name(value: object, description: str) -> str:
    """Strip ``value`` and check that it is a non-empty string of at most ``NAME_LENGTH``."""
    if not isinstance(value, str):
        raise InputError(f"{description} must be a string, got {type(value).__name__} {value!r}")
    name = value.strip()
    if not name:
        raise InputError(f"{description} is empty. Give a name that is not blank.")
    if len(name) > NAME_LENGTH:
        raise InputError(
            f"{description} {name[:40]!r}... has {len(name)} characters, but the maximum is {NAME_LENGTH}"
        )
    return name


def check_text(value: object, description: str) -> str:
    """Strip ``value`` and check that it is a non-empty string of any length."""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{description} must be a non-empty string, got {value!r}")
    return value.strip()


def check_int(value: object, description: str, *, minimum: int | None = 0) -> int:
    """Convert ``value`` to ``int``, accepting NumPy integers and rejecting bools."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{description} must be an integer, got {type(value).__name__} {value!r}")
    number = int(value)
    if minimum is not None and number < minimum:
        raise InputError(f"{description} must be at least {minimum}, got {number}")
    return number


def check_optional_float(
    value: object, description: str, *, minimum: float | None = None, strict: bool = False
) -> float | None:
    """Convert ``value`` to a finite ``float`` or keep None, optionally bounded below."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InputError(
            f"{description} must be a number or None, got {type(value).__name__} {value!r}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise InputError(f"{description} is {number}. Store None for a missing value instead.")
    if minimum is not None and (number < minimum or (strict and number == minimum)):
        relation = "greater than" if strict else "at least"
        raise InputError(f"{description} must be {relation} {minimum}, got {number}")
    return number


def check_age(value: object) -> timedelta:
    """Check that ``value`` is a non-negative ``timedelta``."""
    if not isinstance(value, timedelta):
        raise InputError(
            f"older_than must be a datetime.timedelta, got {type(value).__name__} {value!r}"
        )
    if value < timedelta(0):
        raise InputError(f"older_than must not be negative, got {value}")
    return value


# ---------------------------------------------------------------------- collections


def check_ids(values: Iterable[object], description: str) -> list[int]:
    """Convert ``values`` to a list of distinct positive ids, keeping their order."""
    ids = [check_int(value, description, minimum=1) for value in values]
    duplicates = sorted(value for value, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise InputError(f"{description}s {format_values(duplicates)} are given more than once")
    return ids


def check_id_map(
    mapping: Mapping[object, object], key: str, value: str, *, value_minimum: int = 1
) -> dict[int, int]:
    """Convert a mapping of positive ids to integers, e.g. image id to class id."""
    if not isinstance(mapping, Mapping):
        raise InputError(f"expected a mapping of {key} to {value}, got {type(mapping).__name__}")
    return {
        check_int(k, key, minimum=1): check_int(v, value, minimum=value_minimum)
        for k, v in mapping.items()
    }


def json_value(value: Any, description: str) -> Any:
    """Convert ``value`` to plain JSON data: dicts with string keys, lists, str, numbers, bools.

    NumPy scalars and arrays become Python numbers and lists. NaN and infinity are rejected
    because JSON cannot represent them and PostgreSQL's ``json`` type rejects them.
    """
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.ndarray):
        return json_value(value.tolist(), description)
    if isinstance(value, np.generic):
        return json_value(value.item(), description)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(
                f"{description} is {value}, but JSON cannot store NaN or infinity. Store None instead."
            )
        return float(value)
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(
                    f"{description} has the key {key!r} of type {type(key).__name__}, but JSON keys "
                    "must be strings"
                )
            result[key] = json_value(item, f"{description}[{key!r}]")
        return result
    if isinstance(value, list | tuple):
        return [
            json_value(item, f"{description}[{position}]") for position, item in enumerate(value)
        ]
    raise InputError(
        f"{description} is a {type(value).__name__}, which JSON cannot store. Convert it to a number, "
        "string, list or dict."
    )


# ---------------------------------------------------------------------- store arguments


def class_specs(classes: Sequence[str] | Mapping[str, Prompt]) -> list[tuple[str, Prompt]]:
    """Check class names and prompts and return them as ``[(name, prompt), ...]`` in order."""
    if isinstance(classes, str):
        raise InputError(
            "classes must be a list of names or a mapping of name to prompt, got the string "
            f"{classes!r}"
        )
    if isinstance(classes, Mapping):
        pairs = list(classes.items())
    else:
        pairs = [(name, None) for name in classes]
    if not pairs:
        raise InputError("classes is empty. Give at least one class name.")

    specs: list[tuple[str, Prompt]] = []
    seen: set[str] = set()
    for name, prompt in pairs:
        name = check_name(name, "class name")
        if name in seen:
            raise InputError(f"class name {name!r} is given more than once")
        seen.add(name)
        specs.append((name, _prompt(prompt, name)))
    return specs


def _prompt(prompt: object, name: str) -> Prompt:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return check_text(prompt, f"prompt of class {name!r}")
    if isinstance(prompt, Sequence) and prompt:
        return [check_text(template, f"prompt template of class {name!r}") for template in prompt]
    raise InputError(
        f"prompt of class {name!r} must be a string, a non-empty list of strings or None, got "
        f"{prompt!r}"
    )


def image_rows(records: Iterable[ImageRecordLike]) -> list[dict[str, Any]]:
    """Check image records and convert them to dicts of ``images`` column values."""
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record in records:
        path = fspath(record.path)
        if not path:
            raise InputError("an image record has an empty path")
        if path in seen:
            raise InputError(f"image path {path!r} appears more than once in the records")
        seen.add(path)

        status = enum_value(ImageStatus, record.status, f"status of image {path!r}")
        reason = record.reason
        if status == ImageStatus.OK and reason is not None:
            raise InputError(
                f"image {path!r} has status 'ok' and the reason {reason!r}, but only skipped "
                "images have a reason"
            )
        if status == ImageStatus.SKIPPED and not (isinstance(reason, str) and reason.strip()):
            raise InputError(f"image {path!r} is skipped without a reason. Give the reason.")

        sha256 = record.sha256
        if sha256 is not None and (len(sha256) != 64 or not set(sha256) <= _HEX_DIGITS):
            raise InputError(
                f"sha256 of image {path!r} is {sha256!r}, expected 64 lowercase hex digits"
            )
        width, height = (
            None if size is None else check_int(size, f"{description} of image {path!r}", minimum=1)
            for size, description in ((record.width, "width"), (record.height, "height"))
        )
        rows.append(
            {
                "path": path,
                "sha256": sha256,
                "width": width,
                "height": height,
                "status": status,
                "reason": reason,
            }
        )
    return rows


def batch_items(items: Sequence[int | NewBatchItem], kind: str) -> list[NewBatchItem]:
    """Check batch items against the batch kind and convert them to ``NewBatchItem``s.

    A bare image id gets the purpose ``evaluation`` in an evaluation batch and ``acquisition``
    in the other kinds.
    """
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise InputError(
            f"items must be a sequence of image ids or NewBatchItem, got {type(items).__name__}"
        )
    if not items:
        raise InputError("items is empty, but a batch needs at least one image")

    default_purpose = (
        ItemPurpose.EVALUATION if kind == BatchKind.EVALUATION else ItemPurpose.ACQUISITION
    )
    result: list[NewBatchItem] = []
    for item in items:
        if not isinstance(item, NewBatchItem):
            item = NewBatchItem(check_int(item, "image id", minimum=1), purpose=default_purpose)
        result.append(
            NewBatchItem(
                image_id=check_int(item.image_id, "image id", minimum=1),
                score=check_optional_float(item.score, f"score of image {item.image_id}"),
                purpose=ItemPurpose(enum_value(ItemPurpose, item.purpose, "item purpose")),
            )
        )
    check_ids([item.image_id for item in result], "image id")

    if kind != BatchKind.MIXED:
        other = [item.image_id for item in result if item.purpose != kind]
        if other:
            raise InputError(
                f"a batch of kind {kind!r} contains only {kind} items, but images "
                f"{format_values(other)} have another purpose. Use the kind 'mixed'."
            )
    return result
