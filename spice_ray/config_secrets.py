"""Credentials in configs and manifests: :func:`redact` masks them (values under secret-looking
keys, ``user:password@`` in URIs, secret query parameters); :func:`_strings` lists every string of
a JSON-like value with its dotted key, for the config's check that no URI holds credentials."""

from __future__ import annotations

import re
from typing import Any

_SECRET_KEY = re.compile(r"(token(?!izer|s\b)|secret|password|passwd|credential|api_key|access_key)", re.IGNORECASE)
_URI_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"([?&](?:token|sig|signature|secret|password|key)=)[^&\s]+", re.IGNORECASE)
REDACTED = "***"


def redact(value: Any, key: str = "") -> Any:
    """A copy of a JSON-like value with credentials masked: values under secret-looking keys,
    ``user:password@`` in URIs, and secret query parameters. Manifests and saved configs use it."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if value and _SECRET_KEY.search(key):
            return REDACTED
        value = _URI_USERINFO.sub(rf"\1{REDACTED}@", value)
        return _SECRET_QUERY.sub(rf"\1{REDACTED}", value)
    return value



def _strings(value: Any, key: str = "") -> list[tuple[str, str]]:
    """Every string in a JSON-like value, with its dotted key."""
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _strings(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list):
        return [item for i, v in enumerate(value) for item in _strings(v, f"{key}[{i}]")]
    return [(key, value)] if isinstance(value, str) else []
