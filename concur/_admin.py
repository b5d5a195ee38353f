"""The admin side of ``concur serve``: who may act (the admin token), and live retune.

``DELETE /concur/agents/{id}`` and ``PUT /concur/policy`` need
``Authorization: Bearer <server.admin_token>``; without a configured token they are
disabled. A retune merges the JSON body into the policy settings in force (as a
config layer over the ones below it), validates it, builds the policy and swaps it
into the controller, or changes nothing and says why.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web
from pydantic import SecretStr, ValidationError

from concur import logs
from concur._errors import openai_error
from concur.config import deep_merge, explain
from concur.config._errors import Layer
from concur.control import Controller
from concur.policies import PolicyError, PolicySettings, build_policy

log = logging.getLogger("concur.app")


SOURCE = "PUT /concur/policy"


def policy_problems(exc: ValidationError, payload: dict[str, Any]) -> list[str]:
    """Every problem of a policy payload, worded as the config loader words them: the
    full key (``policy.aimd.high``), the value, where it came from, what is wrong."""
    layer = Layer({(str(key),): SOURCE for key in payload})
    return [
        "policy" + line.removeprefix("(top level)")
        if line.startswith("(top level)")
        else "policy." + line
        for line in explain(exc, PolicySettings, [layer])
    ]


class Admin:
    """The admin token's check and the live policy retune of one runtime."""

    def __init__(
        self, token: SecretStr | None, controller: Controller, policy_settings: PolicySettings
    ) -> None:
        self._token = token
        self.controller = controller
        self.policy_settings = policy_settings
        """The policy settings in force (the configured ones, then each retune's)."""

    def authorize(self, request: web.Request) -> web.Response | None:
        """None when the request carries the admin token; else the 403/401 to send."""
        token = self._token
        if token is None:
            return openai_error(
                403,
                "admin endpoints are disabled: set server.admin_token "
                "(CONCUR_SERVER__ADMIN_TOKEN) to enable them",
                type_="permission_error",
                code="admin_disabled",
            )
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), token.get_secret_value().encode()
        )
        if ok:
            return None
        return openai_error(
            401,
            "missing or wrong admin token: send 'Authorization: Bearer <server.admin_token>'",
            type_="authentication_error",
            code="invalid_admin_token",
            headers={"WWW-Authenticate": 'Bearer realm="concur"'},
        )

    def set_policy(self, payload: Any) -> dict[str, object]:
        """Merge ``payload`` into the current policy settings and swap the policy.

        Raises ValueError (with a message for the client) and keeps the old policy.
        """
        if not isinstance(payload, dict):
            raise ValueError(
                'expected a JSON object such as {"name": "aimd", "aimd": {"high": 0.9}}'
            )
        merged = deep_merge(self.policy_settings.model_dump(exclude_unset=True), payload)
        try:
            new_settings = PolicySettings.model_validate(merged)
        except ValidationError as exc:  # worded as the config loader words it
            raise ValueError("; ".join(policy_problems(exc, payload))) from None
        try:
            policy = build_policy(None, new_settings)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        controller = self.controller
        old = controller.policy.describe()
        controller.set_policy(policy)
        self.policy_settings = new_settings
        described = policy.describe()
        logs.event(log, "policy_changed", old=old, new=described, window=controller.gate.window)
        return described
