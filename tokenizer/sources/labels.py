"""Labels as class ids, checked where they are read: token stores keep labels as int32 and -1
means "no label", so a string, NaN, fraction or out-of-range id fails here, naming its file,
rather than later and far away."""

from __future__ import annotations

import numpy as np

from ..errors import DataError

LABEL_MAX = 2**31 - 1
RANGE_HINT = f"class ids must be 0 to {LABEL_MAX} (-1 for no label)"


def class_ids(labels: np.ndarray, where: str, field: str = "labels") -> np.ndarray:
    """A column of labels as int64 class ids, or a DataError naming ``where``, the ``field``
    and the first bad entry."""
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: '{field}' must be whole class ids; entry {i} is "
                            f"{labels[i]!r}; store -1 for an image without a label")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{where}: '{field}' must be integer class ids, got dtype "
                        f"{labels.dtype}; map class names to 0, 1, 2, ... before saving")
    ids = labels.astype(np.int64)
    bad = (ids < -1) | (ids > LABEL_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: '{field}' entry {i} is {ids[i]}; {RANGE_HINT}")
    return ids


def class_id(value: object, where: str) -> int:
    """One label read from its own file or field (text such as ``"3\\n"``, an int, a whole
    float, or None for no label) as a class id, or a DataError naming ``where``."""
    if value is None:
        return -1
    if isinstance(value, (bytes, str)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        try:
            value = int(text.strip())
        except ValueError:
            raise DataError(f"{where}: label {text.strip()[:40]!r} is not an integer class id; "
                            "map class names to 0, 1, 2, ... before writing") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: label {value!r} is not an integer class id; map class "
                        "names to 0, 1, 2, ... before writing")
    if not -1 <= value <= LABEL_MAX:
        raise DataError(f"{where}: label {value}; {RANGE_HINT}")
    return value
