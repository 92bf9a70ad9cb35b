"""What a run records about where it came from, and what it must never record: credentials.

A tracking URI may carry a user and password (`https://user:secret@host`); it is redacted
wherever pemt writes or logs it (params, the run dir, checkpoints, messages). MLflow itself reads
credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which is where they belong.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pemt

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|secret|key|signature|x-amz-signature)=)[^&\s]+")


def redact(text: str) -> str:
    """`text` with the user:password of any URL in it, and secret query values, replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    return _SECRET_QUERY.sub(r"\1***", text)


def redact_config(tree: Any) -> Any:
    """A resolved config (nested dicts and lists) with every string redacted."""
    if isinstance(tree, dict):
        return {key: redact_config(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_config(value) for value in tree]
    return redact(tree) if isinstance(tree, str) else tree


def _git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _entry_point() -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        job = HydraConfig.get().job.name
    except (ImportError, ValueError):
        return None
    return f"pemt-{job}"  # the app (launch/{job}.py runs the same one)


def context_tags() -> dict[str, str]:
    """MLflow's usual context tags (user, source, its git commit) and pemt's version."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = dict(resolve_tags())
    tags["mlflow.source.type"] = "JOB"
    entry = _entry_point()
    if entry:
        tags["mlflow.source.name"] = entry
    commit = _git_commit(Path(pemt.__file__).resolve().parent.parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    tags["pemt.version"] = pemt.__version__
    return tags


def move_credentials_to_env(uri: str, environ: MutableMapping[str, str]) -> str:
    """`uri` without its user:password, which go to MLFLOW_TRACKING_USERNAME / _PASSWORD in
    `environ` (jobs inherit it), so no config, override file or log ever holds them."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    for key, value in (("MLFLOW_TRACKING_USERNAME", unquote(user)), ("MLFLOW_TRACKING_PASSWORD", unquote(password))):
        if value and environ.get(key, value) != value:
            raise ValueError(
                f"mlflow.tracking_uri={redact(uri)} carries other credentials than {key} in the environment"
            )
        if value:
            environ[key] = value
    return urlunsplit(parts._replace(netloc=host))
