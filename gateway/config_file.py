"""The config file (`--config corral.toml`), validated before anything starts.

A typo must not be accepted silently: `rmp = 1` in an `[[api_keys]]` entry would otherwise
leave that key without a limit, and a `[gatway]` table would tune nothing. So the file is
read against a pydantic model that forbids unknown keys, and any problem becomes one
`ConfigError` naming the file, the key path and, for an unknown name, the nearest valid one.
The `[gateway]` table's fields are the tuning knobs of `GatewayConfig` itself, so a new knob
is valid in the file as soon as it exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import secrets
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from gateway.config import ApiKey, GatewayConfig, ModelEntry

# GatewayConfig fields the file sets at the top level or that flags own: not in [gateway].
_NOT_TUNABLE = {"host", "port", "workers", "models", "redis_url", "cluster_token",
                "cluster_token_generated", "api_keys", "log_level", "model_entries",
                "models_dir"}


class ConfigError(Exception):
    """A config file that cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FrontendHeaders(_Strict):
    """Header names a front end forwards its end user's identity in (identity.py)."""

    user: str | None = None  # the end user's stable id
    name: str | None = None
    email: str | None = None
    role: str | None = None
    chat: str | None = None  # the conversation's id (session affinity)
    jwt: str | None = None  # a signed identity (HS256), when frontend_jwt_secret is set


class ApiKeyEntry(_Strict):
    """One `[[api_keys]]` entry."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    key: str = Field(min_length=1)
    user: str | None = None
    rpm: int | None = Field(None, ge=0)  # requests per minute (0 or absent: unlimited)
    tpm: int | None = Field(None, ge=0)  # tokens per minute
    # A trusted front end (identity.py): its forwarded end-user identity is believed.
    frontend: Literal["openwebui", "headers"] | None = None
    frontend_jwt_secret: str | None = Field(None, min_length=1)  # require a signed identity
    frontend_headers: FrontendHeaders | None = None  # header names, for other front ends
    user_rpm: int | None = Field(None, ge=0)  # per end user, inside the key's own limits
    user_tpm: int | None = Field(None, ge=0)
    tokens_per_day: int | None = Field(None, ge=0)  # budgets (UTC day / month); 429 after
    tokens_per_month: int | None = Field(None, ge=0)
    user_tokens_per_day: int | None = Field(None, ge=0)
    user_tokens_per_month: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _frontend_only(self) -> ApiKeyEntry:
        loose = [n for n in ("frontend_jwt_secret", "frontend_headers", "user_rpm", "user_tpm",
                             "user_tokens_per_day", "user_tokens_per_month")
                 if getattr(self, n) is not None]
        if loose and self.frontend is None:
            raise ValueError(f"{', '.join(loose)} need(s) frontend = \"openwebui\" or "
                             "\"headers\" on the same key")
        if self.frontend == "headers" and not (self.frontend_headers
                                               and self.frontend_headers.user):
            raise ValueError('frontend = "headers" needs frontend_headers.user (the header '
                             "naming the end user)")
        return self

    def to_key(self, i: int) -> ApiKey:
        heads = self.frontend_headers.model_dump(exclude_none=True) if self.frontend_headers \
            else {}
        return ApiKey(
            self.key, self.user or f"key{i}", self.rpm, self.tpm, self.frontend,
            self.frontend_jwt_secret, tuple(sorted(heads.items())), self.user_rpm,
            self.user_tpm, self.tokens_per_day, self.tokens_per_month,
            self.user_tokens_per_day, self.user_tokens_per_month)


class ModelTable(_Strict):
    """One `[[models]]` entry: a catalogued model (`models = ["..."]` strings still work)."""

    name: str = Field(min_length=1)
    path: str | None = None  # a .gguf file; absent: `name` is a bundled model
    pin: bool = False  # always placed (with min_replicas), never evicted or idle-unloaded
    min_replicas: int = Field(1, ge=1)
    aliases: list[str] = Field(default_factory=list)  # other names requests may use

    def to_entry(self) -> ModelEntry:
        return ModelEntry(self.name, self.path or self.name, self.pin, self.min_replicas,
                          tuple(self.aliases))


# `models` holds names (today's list) or tables: told apart by type, so an error names only
# the form that was written (the tags are dropped from error locations, `_describe`).
_TAGS = ("model-name", "model-table")
ModelItem = Annotated[
    Annotated[str, Tag("model-name")] | Annotated[ModelTable, Tag("model-table")],
    Discriminator(lambda v: "model-name" if isinstance(v, str) else "model-table")]


def _tunables() -> dict[str, Any]:
    # The declared types, not the defaults' (a `bool | None` setting defaults to None).
    hints = typing.get_type_hints(GatewayConfig)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(GatewayConfig):
        if f.name in _NOT_TUNABLE or f.default is dataclasses.MISSING:
            continue
        out[f.name] = (hints[f.name] | None, None)
    return out


GatewayTable = create_model("GatewayTable", __base__=_Strict, **_tunables())


class ConfigFile(_Strict):
    """The whole file. Everything is optional; flags and CORRAL_* env vars win over it."""

    cluster_token: str | None = None
    redis_url: str | None = None
    workers: list[str] = Field(default_factory=list)
    models: list[ModelItem] = Field(default_factory=list)  # type: ignore[valid-type]
    models_dir: str | None = None  # every *.gguf in it is catalogued (--models-dir wins)
    api_keys: list[ApiKeyEntry] = Field(default_factory=list)
    gateway: GatewayTable = Field(default_factory=GatewayTable)  # type: ignore[valid-type]


def load(path: str | None) -> ConfigFile:
    """The validated file (an empty one without a path). Raises ConfigError."""
    if not path:
        return ConfigFile()
    try:
        with Path(path).open("rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(_describe(path, raw, e) for e in exc.errors())) from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(path: str, raw: dict[str, Any], err: Any) -> str:
    loc = tuple(p for p in err["loc"] if p not in _TAGS)
    where = _dotted(loc)
    if err["type"] != "extra_forbidden":
        return f"{path}: {where}: {err['msg']}"
    value = _lookup(raw, loc)
    tables = isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    what = "table" if isinstance(value, dict) or tables else "key"
    valid = _names_at(ConfigFile, loc[:-1])
    near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    hint = f"; did you mean {_dotted((*loc[:-1], near[0]))!r}?" if near else \
        f"; valid here: {', '.join(sorted(valid))}"
    return f"{path}: unknown {what} {where!r}{hint}"


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _names_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (sub)model at `loc` (list indices skipped)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        sub = _model_in(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _keys_from_env(raw: str | None) -> list[ApiKey]:
    if not raw:
        return []
    return [ApiKey(k.strip(), f"key{i}") for i, k in enumerate(raw.split(",")) if k.strip()]


def load_config(args: argparse.Namespace) -> GatewayConfig:
    """Builds the config from the CLI's namespace (flags + CORRAL_* env) and `--config`.
    Raises ConfigError for a file that cannot be used."""
    file = load(getattr(args, "config", None))
    workers = list(getattr(args, "worker", None) or []) + file.workers
    models = list(getattr(args, "model", None) or []) + [
        m for m in file.models if isinstance(m, str)]
    tables = [m.to_entry() for m in file.models if isinstance(m, ModelTable)]
    token = getattr(args, "cluster_token", None) or file.cluster_token or ""
    generated = not token
    if generated:
        # Cluster writes always need a token; with none configured, make one up and say it.
        token = secrets.token_urlsafe(24)
    keys = [k.to_key(i) for i, k in enumerate(file.api_keys)]
    keys += _keys_from_env(os.environ.get("CORRAL_API_KEYS"))
    cfg = GatewayConfig(
        host=args.host, port=args.port,
        workers=list(dict.fromkeys(w.rstrip("/") for w in workers)),
        models=list(dict.fromkeys(models)), model_entries=tables,
        models_dir=getattr(args, "models_dir", None) or file.models_dir,
        redis_url=getattr(args, "redis_url", None) or file.redis_url,
        cluster_token=token, cluster_token_generated=generated, api_keys=keys,
        log_level=getattr(args, "log_level", None) or "warning",
        cluster_name=getattr(args, "cluster", None) or "corral",
        discover=getattr(args, "discover", None),
    )
    for name, value in file.gateway.model_dump(exclude_none=True).items():
        setattr(cfg, name, value)  # the optional [gateway] table of tuning knobs
    if os.environ.get("CORRAL_METRICS_TOKEN"):  # a secret: also from the environment
        cfg.metrics_token = os.environ["CORRAL_METRICS_TOKEN"]
    return cfg
