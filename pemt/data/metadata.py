"""A sample's `.json` metadata, read so that no content of it can stop a run: whatever is not an
object with usable labels is a DecodeError (a counted bad sample), never another exception."""

from __future__ import annotations

import json
import math
from typing import Any

from pemt.data.decode import DecodeError

MAX_METADATA_BYTES = 1 << 20  # metadata is a few fields; more is a damaged or foreign member


def _label(value: Any, where: str, lowest: int = -1) -> int:
    """A class index: a whole number (an integral float such as 3.0 too), >= `lowest`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DecodeError(f"json metadata: {where}={value!r} is not a class index")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise DecodeError(f"json metadata: {where}={value!r} is not a class index")
    if value < lowest or value >= 2**31:
        raise DecodeError(f"json metadata: {where}={value!r} is out of range")
    return int(value)


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """The metadata object, with `label` (int, -1 for none) and `labels` (list of int) checked."""
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser goes
        raise DecodeError(f"malformed json metadata: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(meta, dict):
        raise DecodeError(f"json metadata is {type(meta).__name__}, not an object")
    label = _label(meta.get("label", -1), "label")
    labels = meta.get("labels", [] if label < 0 else [label])
    if not isinstance(labels, list):
        raise DecodeError(f"json metadata: labels={labels!r:.100} is not a list")
    return {**meta, "label": label, "labels": [_label(v, "labels[]", lowest=0) for v in labels]}
