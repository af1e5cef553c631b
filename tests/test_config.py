"""Config: errors name the file and the key; the shipped file documents every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from ihld.common.errors import ConfigError
from ihld.core.config import DEFAULT_CONFIG, Config, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ihld.toml"
    path.write_text(text)
    return path


def test_shipped_config_loads() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config.scheduler.policy == "affinity"
    assert config.backends[0].slots == 1


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[[backends]]\nname = 'a'\nslotz = 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: key backends.0.slotz: unknown key" in str(info.value)


def test_bad_value_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key scheduler\.policy"):
        load_config(write(tmp_path, "[scheduler]\npolicy = 'no spaces allowed'\n"))


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[spool\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_env_var_selects_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[spool]\ndir = 'spool'\n")
    monkeypatch.setenv("IHLD_CONFIG", str(path))
    assert load_config().spool.dir == tmp_path / "spool"  # relative to the file


def test_duplicate_backend_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="backend names must be unique"):
        load_config(write(tmp_path, "[[backends]]\nname='a'\n[[backends]]\nname='a'\n"))


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if name == "source":
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_key_is_documented_in_the_shipped_file() -> None:
    text = DEFAULT_CONFIG.read_text()
    from ihld.backends.settings import BackendConfig

    missing = []
    for key in _keys(Config) + [f"backends.{k}" for k in _keys(BackendConfig)]:
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("backends", "pipelines"):
            continue
        # the key appears as an assignment (possibly commented out) preceded by a comment
        pattern = re.compile(rf"^#.*\n(#\s*)?{re.escape(leaf)}\s*=", re.MULTILINE)
        if not pattern.search(text):
            missing.append(key)
    assert not missing, f"undocumented config keys in etc/ihld.toml: {missing}"
