"""Where the tracking store is: `tracking.uri`, the environment or the project's SQLite file, as plain strings.

Kept apart from the MLflow store so that the file checks (paths_guard.py) can name the SQLite database without
importing mlflow.
"""

from __future__ import annotations

import os
from pathlib import Path

from flannel_repro.core.config import TrackingConfig
from flannel_repro.core.credentials import redacted, uri_problem
from flannel_repro.core.errors import ConfigError
from flannel_repro.core.fsutil import project_root

SQLITE = "sqlite:///"


def sqlite_path(uri: str) -> str | None:
    """The database path of a `sqlite:///` URI, as written (relative or absolute); None for any other store."""
    return uri[len(SQLITE):] if uri.startswith(SQLITE) else None


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    """`tracking.uri`, else $MLFLOW_TRACKING_URI, else the SQLite file `mlflow.db` at the project root (where
    `mlflow ui` looks by default). A relative sqlite path in params.yaml is relative to the project root. The URI may
    hold a password (from the environment only: params.yaml refuses one); show it as `credentials.redacted(uri)`."""
    home = project_root(Path(root))
    if cfg.uri:
        rel = sqlite_path(cfg.uri) or ""
        if rel and not rel.startswith("/") and rel != ":memory:":
            return f"{SQLITE}{home / rel}"
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        why = uri_problem(env)
        if why is not None:
            raise ConfigError(f"MLFLOW_TRACKING_URI = {redacted(env)!r} {why}; fix it, or set tracking.uri in "
                              "params.yaml")
    return env or f"{SQLITE}{home / 'mlflow.db'}"
