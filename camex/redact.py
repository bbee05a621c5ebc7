"""Keep secrets out of what a run logs: MLflow params, the `config.json` artifact.

A config value is replaced by `REDACTED` when its key names a secret (`tracking.password`,
`hub_token`, `api_key`, ...) or when it contains the value of a secret environment variable
(`HF_TOKEN`, `MLFLOW_TRACKING_PASSWORD`, `AWS_SECRET_ACCESS_KEY`, anything named *TOKEN*,
*PASSWORD*, *SECRET*, *_KEY, *CREDENTIAL*), e.g. pulled in with `${oc.env:HF_TOKEN}`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
SECRET_ENV_NAME = re.compile(r"TOKEN(?!IZERS)|PASSWORD|PASSWD|SECRET|CREDENTIAL|_KEY$|^KEY_|_KEY_|^API_?KEY", re.I)
SECRET_CONFIG_KEY = re.compile(r"^(.*_)?(token|password|passwd|secret|api_key|access_key|private_key|credentials?)$")
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would redact ordinary settings by coincidence


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names say they hold a secret."""
    env = os.environ if environ is None else environ
    return sorted(
        {v for k, v in env.items() if SECRET_ENV_NAME.search(k) and len(v.strip()) >= MIN_SECRET_LENGTH},
        key=len,
        reverse=True,
    )


def redact_secrets(tree: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of a nested config with every secret-named key and every leaked secret value masked."""
    secrets = secret_values(environ)

    def clean(key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(str(k), v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(key, v) for v in value]
        if value is not None and SECRET_CONFIG_KEY.match(key.lower()):
            return REDACTED
        if isinstance(value, str) and any(s in value for s in secrets):
            return REDACTED
        return value

    return {k: clean(str(k), v) for k, v in tree.items()}
