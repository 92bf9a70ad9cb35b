"""Every config key has one documentation line in docs/configuration.md, and every documented key
exists: adding a key without documenting it (or removing one and leaving its line) fails here."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import pemt.configs
from conftest import REPO
from pemt.config import register_resolvers

CONFIGS = Path(pemt.configs.__file__).parent
GROUPS = {
    group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    for group in ("cluster", "model", "data", "deepspeed", "curriculum")
}
ROW = re.compile(r"^\| `([^`]+)` \| (.*) \|$")


def _leaf_keys(node: DictConfig, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key in node.keys():
        path = f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)  # unresolved: interpolations are keys too
        keys |= _leaf_keys(child, path) if isinstance(child, DictConfig) else {path}
    return keys


def _config_keys() -> set[str]:
    register_resolvers()
    keys: set[str] = set()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        for entry in ("pretrain", "finetune"):
            for group, options in GROUPS.items():
                for option in options:
                    keys |= _leaf_keys(compose(entry, overrides=[f"{group}={option}"]))
    return keys


def _documented() -> dict[str, str]:
    rows = (ROW.match(line) for line in (REPO / "docs" / "configuration.md").read_text().splitlines())
    return {m[1]: m[2].strip() for m in rows if m and m[1] != "key"}


def test_every_config_key_is_documented_and_every_documented_key_exists() -> None:
    keys, documented = _config_keys(), _documented()
    assert len(keys) > 100  # every group option was composed
    assert not sorted(keys - documented.keys()), "config keys without a line in docs/configuration.md"
    assert not sorted(documented.keys() - keys), "docs/configuration.md documents keys no config has"
    assert all(documented.values()), "a documented key with an empty meaning"
