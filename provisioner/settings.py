"""Reading typed settings out of the integration config, with clear errors."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from provisioner.failures import FailureCode
from provisioner.model import ProvisionerError

DEFAULT_API_URL = "https://api.e2b.app"
DEFAULT_TEMPLATE = "base"

# Whitespace, query or fragment have no place in an API base URL.
_URL_FORBIDDEN = re.compile(r"[\s?#]")
# E2B template ids and aliases: letters, digits and a few separators.
_TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def int_setting(config: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = config.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG, f"{key} must be an integer, got {raw[:40]!r}"
        ) from None
    if not low <= value <= high:
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG, f"{key} must be between {low} and {high}, got {value}"
        )
    return value


def float_setting(
    config: Mapping[str, str], key: str, default: float, low: float, high: float
) -> float:
    raw = config.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG, f"{key} must be a number, got {raw[:40]!r}"
        ) from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ProvisionerError(
            FailureCode.INVALID_CONFIG,
            f"{key} must be between {low:g} and {high:g}, got {raw[:40]!r}",
        )
    return value


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    """What to create, and where."""

    api_url: str
    template_id: str
    sandbox_timeout_s: int
    create_timeout_ms: int
    request_timeout_ms: int

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> SandboxSettings:
        api_url = config.get("e2b_api_url", DEFAULT_API_URL).strip().rstrip("/")
        if not api_url.startswith(("https://", "http://")) or _URL_FORBIDDEN.search(api_url):
            raise ProvisionerError(
                FailureCode.INVALID_CONFIG,
                "e2b_api_url must be an http(s) URL without query or fragment",
            )
        template_id = config.get("template_id", DEFAULT_TEMPLATE).strip()
        if not _TEMPLATE_ID.fullmatch(template_id):
            raise ProvisionerError(
                FailureCode.INVALID_CONFIG,
                "template_id must be 1-128 letters, digits or ._:/-,"
                " starting with a letter or digit",
            )
        return cls(
            api_url=api_url,
            template_id=template_id,
            sandbox_timeout_s=int_setting(config, "sandbox_timeout_s", 3600, 1, 86_400),
            create_timeout_ms=int_setting(config, "create_timeout_ms", 60_000, 1_000, 110_000),
            request_timeout_ms=int_setting(config, "request_timeout_ms", 15_000, 500, 60_000),
        )
