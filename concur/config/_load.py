"""One load of the settings from every source, every problem reported at once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from concur.config._errors import ConfigError, explain
from concur.config._schema import Settings
from concur.config._sources import Inputs, reading


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    sets: Sequence[str] = (),
    flags: Mapping[str, tuple[Any, str]] | None = None,
) -> Settings:
    """Build :class:`Settings`: flags > overrides > ``--set`` > env > config file > defaults.

    ``config_file`` defaults to ``$CONCUR_CONFIG`` (looked up in ``env``). ``overrides``
    use dotted keys (``{"policy.aimd.high": 0.9}``); ``sets`` are ``--set`` items
    (``"policy.aimd.high=0.9"``); ``flags`` map dotted keys to (value, the flag that gave
    it). ``env`` defaults to ``os.environ``. Raises :class:`ConfigError` naming every
    problem of every source: each bad field, its value and where it came from.
    """
    inputs = Inputs(
        env=os.environ if env is None else env,
        config_file=config_file,
        flags=flags or {},
        overrides=overrides or {},
        sets=sets,
        collect=True,
    )
    with reading(inputs):
        try:
            settings = Settings()
        except ValidationError as exc:
            raise ConfigError([*inputs.problems, *explain(exc, Settings, inputs.layers)]) from None
    if inputs.problems:
        raise ConfigError(inputs.problems)
    return settings
