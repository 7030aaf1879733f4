"""Operator configuration: what sandboxes the agent may create, and with what.

The model chooses among names the operator configured (network profiles, secrets, images) and
host paths under roots the operator approved. Secret *values* come from the server's own
environment and never appear in configuration, tool arguments or tool output.

Load it from TOML (:func:`load_config`) or build it in code::

    OperatorConfig(
        network_profiles={"pypi": NetworkProfile(allowed_hosts=["pypi.org", "files.pythonhosted.org"])},
        secrets={"GITHUB_TOKEN": SecretSpec(hosts=["api.github.com"])},
        mounts=[MountRoot(host_path="/srv/data", mode="ro")],
    )
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gondolin.http import Secret, expand_presets
from gondolin.options import DnsMode, MountMode, RootfsMode

# How much each of the library's mount modes lets the guest change the host: a root approved
# for "cow" also allows "ro", and "rw" allows everything.
MOUNT_MODE_RANK: dict[MountMode, int] = {"ro": 0, "cow": 1, "rw": 2}

OFFLINE_PROFILE = "offline"
RESTRICTED_PROFILE = "restricted"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Caps on what one server (and each of its sandboxes) may use."""

    max_sandboxes: int = Field(default=4, ge=1, le=256, description="live sandboxes at once")
    max_sandboxes_per_session: int | None = Field(
        default=None, ge=1, le=256, description="live sandboxes one MCP session may own (default: max_sandboxes)")
    default_ttl_s: int = Field(default=900, ge=10, description="idle seconds before a sandbox is destroyed")
    max_ttl_s: int = Field(default=4 * 3600, ge=10)
    reap_interval_s: float = Field(default=10.0, gt=0, description="how often idle sandboxes are looked for")
    default_cpus: int = Field(default=1, ge=1, le=64)
    max_cpus: int = Field(default=4, ge=1, le=64)
    default_memory_mb: int = Field(default=512, ge=128)
    max_memory_mb: int = Field(default=4096, ge=128)
    exec_timeout_s: float = Field(default=120.0, gt=0, description="default exec timeout")
    max_exec_timeout_s: float = Field(default=3600.0, gt=0)
    exec_yield_s: float = Field(default=10.0, ge=0, description="default wait before exec returns an exec_id")
    max_output_bytes: int = Field(default=16 * 1024, ge=256, description="default cap on output shown per stream")
    max_output_bytes_limit: int = Field(default=1024 * 1024, ge=256, description="largest max_output_bytes allowed")
    exec_buffer_bytes: int = Field(default=1024 * 1024, ge=1024, description="unread output kept per stream")
    max_read_bytes: int = Field(default=32 * 1024, ge=1024,
                                description="most content read_file returns per call (MCP clients cap tool output)")
    max_file_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="largest file edited or read by lines")
    max_write_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_list_entries: int = Field(default=5000, ge=1)
    max_walk_entries: int = Field(default=50_000, ge=1, description="entries visited by one recursive list")
    max_execs_per_sandbox: int = Field(default=16, ge=1, description="commands tracked per sandbox")
    max_checkpoints: int = Field(default=16, ge=0)
    max_checkpoints_per_session: int | None = Field(
        default=None, ge=0, description="checkpoints one MCP session may keep (default: max_checkpoints)")
    pool_size: int = Field(default=1, ge=0, le=16,
                           description="spare VMs kept ready (restored, not yet configured) of the default "
                                       "sandbox's shape, plus one of the last other shape created, so "
                                       "sandbox_create only configures one; 0 disables. Spares are not "
                                       "sandboxes: they count against no sandbox limit")

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        for low, high in (("default_ttl_s", "max_ttl_s"), ("default_cpus", "max_cpus"),
                          ("default_memory_mb", "max_memory_mb"), ("exec_timeout_s", "max_exec_timeout_s"),
                          ("max_output_bytes", "max_output_bytes_limit")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"limits.{low} may not exceed limits.{high}")
        return self


class NetworkProfile(_Strict):
    """A named egress policy the model may pick for a sandbox."""

    enabled: bool = Field(default=True, description="give the guest a NIC at all")
    allowed_hosts: tuple[str, ...] = ()
    allow: tuple[str, ...] = Field(default=(), description="host presets added to allowed_hosts: pypi, npm, github")
    allowed_internal_hosts: tuple[str, ...] = ()
    tcp_hosts: dict[str, str] = Field(default_factory=dict)
    dns: DnsMode = "synthetic"
    description: str = ""
    image: str | None = Field(default=None, description="image of this profile's sandboxes when sandbox_create "
                                                        "names none (one of allowed_images)")

    @model_validator(mode="after")
    def _consistent(self) -> NetworkProfile:
        if not self.enabled and (self.allowed_hosts or self.allow or self.allowed_internal_hosts or self.tcp_hosts):
            raise ValueError("a profile with enabled = false cannot allow hosts")
        expand_presets(self.allow)  # an unknown preset is an error here, not at sandbox_create
        return self

    def hosts(self) -> tuple[str, ...]:
        """``allowed_hosts`` with the presets' hosts added."""
        return tuple(dict.fromkeys((*self.allowed_hosts, *expand_presets(self.allow))))

    def summary(self) -> str:
        if self.description:
            return self.description
        if not self.enabled:
            return "no network at all"
        hosts = list(self.hosts()) + list(self.allowed_internal_hosts)
        if not hosts and not self.tcp_hosts:
            return "network device, but every request is blocked (blocked requests show in network_events)"
        return "HTTP(S) to " + ", ".join(hosts or ["(none)"]) + (
            f"; raw TCP to {', '.join(self.tcp_hosts)}" if self.tcp_hosts else "")


BUILTIN_PROFILES: dict[str, NetworkProfile] = {
    OFFLINE_PROFILE: NetworkProfile(enabled=False),
    RESTRICTED_PROFILE: NetworkProfile(),
}


class SecretSpec(_Strict):
    """A secret the model may bind by name. The value is read from ``env`` in the server's environment."""

    env: str | None = Field(default=None, description="environment variable with the value (default: the secret's name)")
    hosts: tuple[str, ...] = Field(min_length=1, description="hosts the value may be sent to, optionally HOST:PORT")
    schemes: tuple[Literal["http", "https"], ...] = Field(
        default=("https",), min_length=1, description="schemes the value may travel over (http only when listed)")
    ports: tuple[int, ...] | None = Field(default=None, description="ports (default: each scheme's default port)")
    description: str = ""

    @model_validator(mode="after")
    def _scope(self) -> SecretSpec:
        self.secret("x")  # the library's own checks on hosts, schemes and ports, before any sandbox
        return self

    def secret(self, value: str) -> Secret:
        """The library's secret with this scope and ``value``."""
        return Secret(value, hosts=self.hosts, schemes=self.schemes, ports=self.ports)


class MountRoot(_Strict):
    """A host directory the operator approved; sandboxes may mount it or anything below it."""

    host_path: str
    mode: MountMode = "ro"
    guest_path: str | None = Field(default=None, description="default mount point in the guest")

    @field_validator("host_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        path = Path(os.path.expanduser(value))
        if not path.is_absolute():
            raise ValueError(f"mount host_path must be absolute: {value!r}")
        return os.path.realpath(path)

    @field_validator("guest_path")
    @classmethod
    def _guest_absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"mount guest_path must be absolute: {value!r}")
        return value


class HttpSettings(_Strict):
    """The MCP server's streamable HTTP transport: who may connect, and what a session owns."""

    auth: bool = Field(default=True, description="require a bearer token on every request")
    token_file: str | None = Field(default=None, description="file holding the bearer token (default: "
                                   "$GONDOLIN_MCP_TOKEN, else one generated at start and printed to stderr)")
    session_grace_s: float = Field(default=60.0, gt=0, le=86400, description="seconds a session may have no "
                                   "open HTTP request before it ends and its sandboxes close (reconnect window)")
    share_sandboxes: bool = Field(default=False, description="every session may see and use every sandbox")


class OperatorConfig(_Strict):
    limits: Limits = Field(default_factory=Limits)
    default_image: str = "default"
    allowed_images: tuple[str, ...] = ("default",)
    rootfs: RootfsMode = "cow"
    env: dict[str, str] = Field(default_factory=dict, description="environment for every sandbox")
    default_network: str = RESTRICTED_PROFILE
    network_profiles: dict[str, NetworkProfile] = Field(default_factory=dict)
    secrets: dict[str, SecretSpec] = Field(default_factory=dict)
    mounts: tuple[MountRoot, ...] = ()
    checkpoint_dir: str | None = Field(default=None, description="where checkpoints go (default: a temp dir per server)")
    http: HttpSettings = Field(default_factory=HttpSettings)

    @model_validator(mode="after")
    def _known_names(self) -> OperatorConfig:
        if self.default_network not in self.profiles():
            raise ValueError(f"default_network {self.default_network!r} is not a configured network profile")
        if self.default_image not in self.allowed_images:
            raise ValueError(f"default_image {self.default_image!r} is not in allowed_images")
        for name, profile in self.network_profiles.items():
            if profile.image is not None and profile.image not in self.allowed_images:
                raise ValueError(f"network profile {name!r} names image {profile.image!r}, which is not in "
                                 "allowed_images")
        return self

    def profiles(self) -> dict[str, NetworkProfile]:
        """Built-in profiles (``offline``, ``restricted``) plus the operator's; the operator's win."""
        return {**BUILTIN_PROFILES, **self.network_profiles}

    def secret_value(self, name: str, environ: Mapping[str, str]) -> str | None:
        spec = self.secrets[name]
        return environ.get(spec.env or name)


class ConfigError(ValueError):
    """The operator configuration file is missing, unreadable or invalid."""


def load_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> OperatorConfig:
    """Read a TOML file (if given) and apply keyword overrides on top; validate everything."""
    data: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        network = data.pop("network", None)
        if isinstance(network, dict):
            if "profiles" in network:
                data["network_profiles"] = network.pop("profiles")
            if "default" in network:
                data["default_network"] = network.pop("default")
            if network:
                raise ConfigError(f"unknown keys in [network]: {', '.join(sorted(network))}")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        elif isinstance(value, (list, tuple)) and isinstance(data.get(key), list):
            data[key] = [*data[key], *value]  # type: ignore[misc]
        else:
            data[key] = value
    try:
        return OperatorConfig.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid Gondolin configuration{where}:\n{exc}") from exc
