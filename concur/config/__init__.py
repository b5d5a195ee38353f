"""concur's configuration: one validated :class:`Settings` tree for the whole system.

Sources, highest precedence first:

1. command-line flags (``--set KEY=VALUE`` and command flags such as ``--upstream``),
   passed to :func:`load_settings` as ``flags`` and ``sets``;
2. environment variables: ``CONCUR_`` + section + ``__`` + field, e.g.
   ``CONCUR_UPSTREAM__URL=http://vllm:8000`` or ``CONCUR_POLICY__AIMD__HIGH=0.9``;
3. a config file, TOML (``.toml``) or YAML (``.yaml``/``.yml``), named by ``--config``
   or ``CONCUR_CONFIG``;
4. the defaults.

The package keeps its jobs apart: the models (``_schema``, with value checks in
``_checks``), the sources (``_sources``, the config file in ``_files``), one load through
them (``_load``), error text (``_errors``), the files ``concur config`` prints
(``_render``) and walking the model tree (``_tree``). Command-line glue (argparse,
printing, exit codes) is in :mod:`concur._cli_config`.
"""

from concur.config._checks import tls_context
from concur.config._errors import ConfigError, explain
from concur.config._load import load_settings
from concur.config._render import iter_fields, render_effective, render_example
from concur.config._schema import (
    AdmissionSettings,
    ControlSettings,
    EngineSettings,
    ServerSettings,
    Settings,
    UpstreamSettings,
)
from concur.config._sources import CONFIG_ENV_VAR, ENV_PREFIX, deep_merge, parse_set_value

__all__ = [
    "CONFIG_ENV_VAR",
    "ENV_PREFIX",
    "AdmissionSettings",
    "ConfigError",
    "ControlSettings",
    "EngineSettings",
    "ServerSettings",
    "Settings",
    "UpstreamSettings",
    "deep_merge",
    "explain",
    "iter_fields",
    "load_settings",
    "parse_set_value",
    "render_effective",
    "render_example",
    "tls_context",
]
