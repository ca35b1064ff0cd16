"""lstmkit's environment variables, read where they take effect, at each call.

``LSTMKIT_BACKEND`` and ``LSTMKIT_CPU_TARGET`` may change while a process runs (tests set them,
a user may too), so every forward call reads them. ``os.environ.get`` costs most of a
microsecond per read (the name is encoded and the value decoded each time), a visible part of
a small call that reads several; on POSIX, ``os.environ`` keeps its values in a dict of bytes,
updated with every assignment to it, and reading that dict costs a tenth as much. Either way
the value is what ``os.environ`` holds now.
"""

from __future__ import annotations

import os

# os.environ's own storage where it is a dict of encoded names and values (POSIX), else None
_STORE = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_STORE, dict):
    _STORE = None
_KEYS: dict[str, bytes] = {}


def read(name: str) -> str:
    """The value of environment variable ``name``, stripped; ``""`` when it is unset."""
    if _STORE is None:
        return os.environ.get(name, "").strip()
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = _STORE.get(key)
    return "" if value is None else os.fsdecode(value).strip()
