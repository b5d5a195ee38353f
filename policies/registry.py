"""Policy names and specs: aimd, aimd:paper, static:64, unlimited, fit, epp."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from concur.policies.aimd import AIMD, PRESETS, AIMDParams
from concur.policies.base import Policy
from concur.policies.epp import EPP, EPPParams
from concur.policies.fit import Fit, FitParams
from concur.policies.static import Static, StaticParams, Unlimited

POLICY_NAMES = ("aimd", "static", "unlimited", "fit", "epp")
POLICY_SPECS = (
    f"aimd, aimd:<preset> ({', '.join(p for p in PRESETS if p != 'default')}), "
    "static:<N>, unlimited, fit or epp"
)
"""Every policy spec, for help texts."""


class PolicyError(ValueError):
    """A policy spec or parameter set that cannot be used, with what is allowed."""


class PolicySettings(BaseModel):
    """The policy to run and every policy's parameters (only the chosen one is used)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(
        "aimd",
        description=POLICY_SPECS,
    )
    aimd: AIMDParams = Field(default_factory=AIMDParams)
    static: StaticParams = Field(default_factory=StaticParams)
    fit: FitParams = Field(default_factory=FitParams)
    epp: EPPParams = Field(default_factory=EPPParams)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"static:64"`` -> ``("static", "64")``; checks the name."""
    name, _, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in POLICY_NAMES:
        raise PolicyError(f"unknown policy {spec!r}; allowed: {', '.join(POLICY_NAMES)}")
    return name, (arg.strip() or None)


def aimd_params(settings: AIMDParams, preset: str) -> AIMDParams:
    """A preset's values, overridden by the fields the user set explicitly."""
    if preset not in PRESETS:
        raise PolicyError(f"unknown aimd preset {preset!r}; allowed: {', '.join(PRESETS)}")
    explicit = settings.model_dump(include=settings.model_fields_set)
    merged: dict[str, Any] = {**PRESETS[preset], **explicit}
    try:
        return AIMDParams(**merged)
    except ValidationError as exc:
        raise PolicyError(f"aimd:{preset}: {exc}") from exc


def build_policy(spec: str | None = None, settings: PolicySettings | None = None) -> Policy:
    """Build a fresh policy object from a spec and the settings' parameters."""
    settings = settings or PolicySettings()
    name, arg = split_spec(spec or settings.name)
    if name == "aimd":
        return AIMD(aimd_params(settings.aimd, arg or "default"), preset=arg or "default")
    if name == "static":
        params = settings.static
        if arg is not None:
            try:
                window = int(arg)
            except ValueError:
                raise PolicyError(f"static:N needs a whole number of agents, got {arg!r}") from None
            if window < 1:
                raise PolicyError(f"static:N needs N >= 1, got {window}")
            params = StaticParams(window=window)
        return Static(params)
    if arg is not None:
        raise PolicyError(f"policy {name!r} takes no ':' argument, got {spec!r}")
    if name == "unlimited":
        return Unlimited()
    if name == "fit":
        return Fit(settings.fit)
    return EPP(settings.epp)
