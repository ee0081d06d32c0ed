"""The settings of ``curate``: CurateConfig, from flags or a YAML file."""

from __future__ import annotations

import difflib
import json
import warnings
from dataclasses import dataclass, fields

import click
from click.core import ParameterSource

from dask_imgcurate.cli.output import _one_line


@dataclass
class CurateConfig:
    """Every setting of ``curate`` (flags, or a YAML file with these keys)."""

    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    aesthetic_model: str | None = None
    nsfw_model: str | None = None
    allow_download: bool = False
    batch_size: int = 256
    num_threads: int = 4
    min_aesthetic: float | None = None
    max_nsfw: float | None = None
    query: str | None = None
    layout: str = "webdataset"
    samples_per_shard: int = 10000
    max_shards: int = 5
    images_per_tar: int = 1000
    scheduler_address: str | None = None
    n_workers: int | None = None
    storage_options: dict | None = None
    lenient: bool = False
    on_mismatch: str = "raise"

    @classmethod
    def from_yaml(cls, path: str) -> CurateConfig:
        """Settings from a YAML mapping of these keys; unknown keys and wrong types raise."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"config file is a directory: {path}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {_one_line(err)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {known})"
                raise ValueError(f"{path}: unknown key {key!r}{hint}")
        config = cls()
        for key, value in data.items():
            setattr(config, key, _typed(key, value, path))
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming the setting when a value is out of range."""
        if self.layout not in ("webdataset", "images"):
            raise ValueError(f"layout must be 'webdataset' or 'images', not {self.layout!r}")
        if self.on_mismatch not in ("raise", "drop"):
            raise ValueError(f"on_mismatch must be 'raise' or 'drop', not {self.on_mismatch!r}")
        for name in ("batch_size", "num_threads", "samples_per_shard", "max_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images_per_tar < 1:
            raise ValueError(f"images_per_tar must be >= 1, got {self.images_per_tar}")
        if self.n_workers is not None and self.n_workers < 0:
            raise ValueError(f"n_workers must be >= 0, got {self.n_workers}")
        if self.pretrained is not None and self.pretrained.lower() in ("none", ""):
            self.pretrained = None


_DEFAULTS = CurateConfig()
_FIELDS = {f.name: str(f.type) for f in fields(CurateConfig)}


def _typed(key: str, value, source: str):
    """``value`` checked against the type of setting ``key`` (from YAML)."""
    kinds = _FIELDS[key].split(" | ")
    if value is None:
        if "None" in kinds:
            return None
        raise ValueError(f"{source}: {key} must not be empty")
    kind = kinds[0]
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "dict" and isinstance(value, dict):
        return value
    names = {"bool": "true or false", "int": "an integer", "float": "a number"}
    names.update(str="a string", dict="a mapping")
    hint = ""
    if kind in ("int", "float") and isinstance(value, str):
        try:
            float(value)
            hint = " (YAML reads 1e3 as text: write 1.0e3)"
        except ValueError:
            pass
    raise ValueError(f"{source}: {key} must be {names[kind]}, not {value!r}{hint}")


def _storage_options(value: str | dict | None) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    try:
        options = json.loads(value)
    except ValueError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--storage-options") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return options


def _settings(ctx: click.Context, config_path: str | None = None) -> CurateConfig:
    """The YAML file's settings (or the defaults), overridden by the flags given."""
    config = CurateConfig.from_yaml(config_path) if config_path else CurateConfig()
    for name, value in ctx.params.items():
        if name not in _FIELDS:
            continue
        if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            continue  # not given: the YAML value (or the default) stands
        if name == "storage_options":
            value = _storage_options(value)
        setattr(config, name, value)
    config.check()
    _warn_unused(ctx, config)
    return config


def _warn_unused(ctx: click.Context, config: CurateConfig) -> None:
    """Flags given that the other settings make meaningless: said, not silently ignored."""
    given = {
        name
        for name in ctx.params
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
    }
    unused = []
    if config.layout == "images":
        unused += [f for f in ("samples_per_shard", "max_shards") if f in given]
    elif "images_per_tar" in given:
        unused.append("images_per_tar")
    if config.scheduler_address and "n_workers" in given:
        unused.append("n_workers")
    for name in unused:
        flag = "--" + name.replace("_", "-")
        why = (
            "the running cluster at --scheduler-address has its own workers"
            if name == "n_workers"
            else f"it does not apply to --layout {config.layout}"
        )
        warnings.warn(f"{flag} is ignored: {why}", UserWarning, stacklevel=2)
