"""What a run records about where it came from (`context_tags`), and where a tracking URI's
credentials go instead of any file: MLflow's MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
(`move_credentials_to_env`). Masking them in what is written is `pemt.secrets`."""

from __future__ import annotations

import subprocess
from collections.abc import MutableMapping
from pathlib import Path

import pemt
from pemt.secrets import redact


# (a scheme's colon may come escaped, as Hydra writes overrides: `http\://user\:pw@host`)
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
