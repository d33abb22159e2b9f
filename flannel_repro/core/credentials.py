"""Credentials in a tracking URI: found, kept out of every file and line, and sent the way MLflow sends them.

A URI such as `https://alice:S3cret@mlflow.example.org` or `postgresql://alice:S3cret@db/mlflow` carries a password.
params.yaml refuses one (its params are recorded in every trajectory header and tracking run); through
MLFLOW_TRACKING_URI it is used to connect but shown and stored only as `redacted(uri)`. MLflow's own convention for
an HTTP server, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, keeps the URI itself clean (docs/security.md).

    redacted("https://alice:S3cret@host")   # 'https://alice:***@host'
    uri_problem("http://[::1")              # 'is not a valid URI (Invalid IPv6 URL)'
"""

from __future__ import annotations

import base64
import os
from urllib.parse import SplitResult, unquote, urlsplit

HIDDEN = "***"


def _parts(uri: str) -> SplitResult | None:
    return None if _invalid(uri) else urlsplit(uri)


def _invalid(uri: str) -> str | None:
    """What urllib says is wrong with `uri` (an unclosed IPv6 bracket, a port that is not a number), or None."""
    try:
        port = urlsplit(uri).port  # a port that is not a number raises here, not later inside a client
    except ValueError as e:
        return str(e)
    del port
    return None


def uri_problem(uri: str) -> str | None:
    """Why `uri` cannot name a tracking store (without repeating any secret in it), or None."""
    why = _invalid(uri)
    if why is not None:
        return f"is not a valid URI ({why})"
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and not parts.hostname:
        return "names no host"
    return None


def has_password(uri: str) -> bool:
    parts = _parts(uri)
    return parts is not None and parts.password is not None


def redacted(uri: str) -> str:
    """`uri` with the password of its user part replaced by ***: the form every message, log line and file holds."""
    parts = _parts(uri)
    if parts is None or parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{HIDDEN}@{host}").geturl()


def scrub(text: str, uri: str) -> str:
    """`text` (an error message from a client library, say) with the password of `uri` replaced by ***."""
    parts = _parts(uri)
    if parts is None or not parts.password:
        return text
    return text.replace(uri, redacted(uri)).replace(parts.password, HIDDEN)


def without_user(uri: str) -> str:
    """`uri` without its user part: what an HTTP request line is sent to."""
    parts = _parts(uri)
    if parts is None or "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def basic_auth(uri: str) -> str | None:
    """The HTTP Authorization header for `uri`: its user part, else MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (as MLflow's client sends them); None without credentials."""
    parts = _parts(uri)
    if parts is not None and parts.username:
        user, password = unquote(parts.username), unquote(parts.password or "")
    else:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if not user:
        return None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
