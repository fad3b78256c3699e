"""Where the `tuneship` CLI finds Airflow and the gateway, and with which credentials.

Sources, strongest first: environment variables (CI secrets), the config file (`--config`,
env TUNESHIP_CONFIG, else `$XDG_CONFIG_HOME/tuneship/config.toml` if it exists), then the
embedded default of this machine (`make up`): Airflow on 127.0.0.1:$TUNESHIP_PORT_AIRFLOW with
the admin password from TUNESHIP_HOME, the gateway at `tuneship.config.gateway_url()` with
the admin token file the gateway wrote. Both layers are validated; errors name the file or
variable and the field.

    [airflow]
    url = "https://airflow.example.com"
    username = "ci-bot"          # with password; or token = "<JWT>" instead of both
    password = "..."
    [gateway]
    url = "https://llm-gateway.example.com"
    admin_token = "..."
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from tuneship import config, gateway_admin, services

# variable -> (section, field)
ENV: dict[str, tuple[str, str]] = {
    "TUNESHIP_AIRFLOW_URL": ("airflow", "url"),
    "TUNESHIP_AIRFLOW_USERNAME": ("airflow", "username"),
    "TUNESHIP_AIRFLOW_PASSWORD": ("airflow", "password"),
    "TUNESHIP_AIRFLOW_TOKEN": ("airflow", "token"),
    "TUNESHIP_GATEWAY_URL": ("gateway", "url"),
    "TUNESHIP_GATEWAY_ADMIN_TOKEN": ("gateway", "admin_token"),
}


class ConfigError(Exception):
    """Configuration the CLI cannot work with; the message says which field and what to do."""


class AirflowSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl | None = None
    username: str = Field(default=services.ADMIN_USER, min_length=1)
    password: SecretStr | None = None
    token: SecretStr | None = None


class GatewaySection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl | None = None
    admin_token: SecretStr | None = None


class CLISettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    airflow: AirflowSection = Field(default_factory=AirflowSection)
    gateway: GatewaySection = Field(default_factory=GatewaySection)


def default_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tuneship" / "config.toml"


def _errors(exc: ValidationError, where: Any) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        lines.append(f"{where(field)}: {err['msg']}")
    return "\n".join(lines)


def _env_name(field: str) -> str:
    for name, loc in ENV.items():
        if ".".join(loc) == field:
            return f"environment variable {name} ({field})"
    return field


def load(path: Path | None = None) -> tuple[CLISettings, Path | None]:
    """(validated settings, the config file read or None)."""
    explicit = path or (Path(os.environ["TUNESHIP_CONFIG"]) if os.environ.get("TUNESHIP_CONFIG") else None)
    path = explicit or default_path()
    data: dict[str, Any] = {}
    used: Path | None = None
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: not valid TOML ({exc}); fix it or point --config elsewhere") from None
        try:
            CLISettings.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_errors(exc, lambda f: f"config file {path}: field {f}")) from None
        used = path
    elif explicit is not None:
        raise ConfigError(f"config file {path} does not exist (from --config or TUNESHIP_CONFIG)")
    for name, (section, key) in ENV.items():
        value = os.environ.get(name)
        if value:
            data.setdefault(section, {})[key] = value
    try:
        return CLISettings.model_validate(data), used
    except ValidationError as exc:
        raise ConfigError(_errors(exc, _env_name)) from None


@dataclass(frozen=True)
class Endpoints:
    """What the commands connect to, resolved once (defaults filled in)."""

    settings: CLISettings
    file: Path | None

    @property
    def airflow_url(self) -> str:
        url = self.settings.airflow.url
        return str(url).rstrip("/") if url else f"http://127.0.0.1:{config.Ports.from_env().airflow}"

    @property
    def gateway_url(self) -> str:
        url = self.settings.gateway.url
        return str(url).rstrip("/") if url else config.gateway_url()

    def airflow_credentials(self) -> tuple[str, str | None, str | None]:
        """(username, password, token); raises ConfigError when there is neither."""
        a = self.settings.airflow
        if a.token:
            return a.username, None, a.token.get_secret_value()
        if a.password:
            return a.username, a.password.get_secret_value(), None
        local = services.airflow_home() / "passwords.json"
        if a.url is None and local.exists():  # the embedded default of this machine
            return services.ADMIN_USER, json.loads(local.read_text())[services.ADMIN_USER], None
        raise ConfigError("no Airflow credentials: set TUNESHIP_AIRFLOW_TOKEN, or TUNESHIP_AIRFLOW_USERNAME and "
                          "TUNESHIP_AIRFLOW_PASSWORD (or [airflow] token / password in the config file)")

    def gateway_token(self) -> str:
        tok = self.settings.gateway.admin_token
        if tok:
            return tok.get_secret_value()
        saved = gateway_admin.saved_token() if self.settings.gateway.url is None else None
        if saved:
            return saved
        raise ConfigError("no gateway admin token: set TUNESHIP_GATEWAY_ADMIN_TOKEN "
                          "(or [gateway] admin_token in the config file)")

    def describe(self) -> dict[str, Any]:
        """Resolved endpoints for `tuneship config`: secrets only as set / not set."""
        a, g = self.settings.airflow, self.settings.gateway
        try:
            user, password, token = self.airflow_credentials()
            auth = "token" if token else f"password for {user}"
        except ConfigError:
            auth = "none"
        try:
            gw_auth = "set" if self.gateway_token() else "none"
        except ConfigError:
            gw_auth = "none"
        return {"config_file": str(self.file) if self.file else None,
                "airflow": {"url": self.airflow_url, "auth": auth, "from_config": a.url is not None},
                "gateway": {"url": self.gateway_url, "admin_token": gw_auth, "from_config": g.url is not None}}


def endpoints(path: Path | None = None) -> Endpoints:
    settings, used = load(path)
    return Endpoints(settings, used)
