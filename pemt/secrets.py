"""Credentials never shown: a URL's user:password (`https://user:secret@host`), secret query
values, and the value of any key named like a secret (`...password`, `...secret...`, `...token`)
are masked wherever pemt writes or logs them (params, run dirs and their names, checkpoints,
messages, and every log line through `SecretFilter`). A leaf: imports nothing of pemt."""

from __future__ import annotations

import logging
import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*\\?://)(?P<userinfo>[^/@\s]+)@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|secret|key|signature|x-amz-signature)=)[^&\s]+")
# A key named like a secret: password, passwd, secret anywhere in its last part, or token as a
# word of it (`api_token`, `AWS_SESSION_TOKEN`; not `tokens_per_clip`).
_SECRET_NAME = r"[\w.-]*?(?:password|passwd|secret|(?<![a-z])token(?![a-z]))[\w-]*"
_SECRET_SETTING = re.compile(rf"(?i)(?P<key>\b{_SECRET_NAME})(?P<sep>['\"]?\\?[=:]\s*['\"]?)(?P<value>[^\s'\",}}&]+)")


def redact(text: str) -> str:
    """`text` with the user:password of any URL in it, secret query values and the values of keys
    named like secrets (`KEY=value`, `KEY: value`) replaced by ***."""
    text = _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    text = _SECRET_QUERY.sub(r"\1***", text)
    return _SECRET_SETTING.sub(lambda m: f"{m.group('key')}{m.group('sep')}***", text)


def is_secret_name(key: str) -> bool:
    return re.fullmatch(f"(?i){_SECRET_NAME}", key.rsplit(".", 1)[-1]) is not None


def redact_config(tree: Any) -> Any:
    """A resolved config (nested dicts and lists) with every string redacted, and the value of
    every key named like a secret masked."""
    if isinstance(tree, dict):
        return {key: "***" if is_secret_name(str(key)) else redact_config(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redact_config(value) for value in tree]
    return redact(tree) if isinstance(tree, str) else tree


def mask_secret_overrides(override_dirname: str) -> str:
    """Hydra's `key=value,key=value` with the values of secret-named keys masked (a run's name)."""
    return (
        ",".join(
            f"{key}=***" if sep and is_secret_name(key.lstrip("+~")) else f"{key}{sep}{value}"
            for key, sep, value in (part.partition("=") for part in override_dirname.split(","))
        )
        if override_dirname
        else override_dirname
    )


class SecretFilter(logging.Filter):
    """Masks credentials (`redact`) in every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def mask_log_secrets(*loggers: logging.Logger) -> None:
    """Every handler of these loggers (default: the root logger) masks credentials."""
    for logger in loggers or (logging.getLogger(),):
        for handler in logger.handlers:
            if not any(isinstance(f, SecretFilter) for f in handler.filters):
                handler.addFilter(SecretFilter())
