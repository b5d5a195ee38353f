"""Policy names and specs: aimd, aimd:paper, static:64, unlimited, fit, epp."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )

    name: str = Field(
        "aimd",
        description=POLICY_SPECS,
    )
    aimd: AIMDParams = Field(default_factory=AIMDParams)
    """Parameters of aimd (values set here override an aimd:<preset>)."""
    static: StaticParams = Field(default_factory=StaticParams)
    """Parameters of static (static:N overrides window)."""
    fit: FitParams = Field(default_factory=FitParams)
    """Parameters of fit: admit what fits, pause the newest when over."""
    epp: EPPParams = Field(default_factory=EPPParams)
    """Parameters of epp, a request-level gate (comparison baseline)."""

    @field_validator("name")
    @classmethod
    def _spec(cls, v: str) -> str:
        split_spec(v)  # a PolicyError is a ValueError: reported as this field's error
        return v


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"static:64"`` -> ``("static", "64")``; checks the name and its argument."""
    name, _, rest = spec.strip().partition(":")
    name, arg = name.strip().lower(), (rest.strip() or None)
    if name not in POLICY_NAMES:
        raise PolicyError(f"unknown policy {spec!r}; allowed: {', '.join(POLICY_NAMES)}")
    if arg is None:
        return name, arg
    if name == "aimd" and arg not in PRESETS:
        raise PolicyError(f"unknown aimd preset {arg!r}; allowed: {', '.join(PRESETS)}")
    if name == "static" and not (arg.isdecimal() and int(arg) >= 1):
        raise PolicyError(f"static:N needs a whole number N >= 1, got {arg!r}")
    if name not in ("aimd", "static"):
        raise PolicyError(f"policy {name!r} takes no ':' argument, got {spec!r}")
    return name, arg


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
        return Static(settings.static if arg is None else StaticParams(window=int(arg)))
    if name == "unlimited":
        return Unlimited()
    if name == "fit":
        return Fit(settings.fit)
    return EPP(settings.epp)
