"""Pure control laws: one observation in, one decision out, time passed in as data."""

from concur.policies.aimd import AIMD, AIMDParams
from concur.policies.base import Decision, Observation, Policy
from concur.policies.epp import EPP, EPPParams
from concur.policies.fit import Fit, FitParams
from concur.policies.growth import GrowthEstimator
from concur.policies.registry import POLICY_NAMES, PolicyError, PolicySettings, build_policy
from concur.policies.static import Static, StaticParams, Unlimited

__all__ = [
    "AIMD",
    "EPP",
    "POLICY_NAMES",
    "AIMDParams",
    "Decision",
    "EPPParams",
    "Fit",
    "FitParams",
    "GrowthEstimator",
    "Observation",
    "Policy",
    "PolicyError",
    "PolicySettings",
    "Static",
    "StaticParams",
    "Unlimited",
    "build_policy",
]
