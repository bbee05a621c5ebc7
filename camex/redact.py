"""Keep secrets out of what a run logs: MLflow params and tags, the `config.json` artifact, the
run's config record and the console.

A config value is replaced by `REDACTED` when its key names a secret (`tracking.password`,
`hub_token`, `api_key`, `tracking.tags.token`, ...) or when it contains the value of a secret
environment variable (`HF_TOKEN`, `MLFLOW_TRACKING_PASSWORD`, `AWS_SECRET_ACCESS_KEY`, anything
named *TOKEN*, *PASSWORD*, *SECRET*, *_KEY, *CREDENTIAL*), e.g. pulled in with `${oc.env:HF_TOKEN}`.
A password inside a URI (`http://user:pw@host`) is masked wherever the URI is logged or printed.
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
OVERRIDE = re.compile(r"^(?P<prefix>[+~]*)(?P<key>[A-Za-z_][\w.@/-]*)=")
URI_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<password>[^@/\s]+)@", re.I)


def redact_uri(text: str) -> str:
    """`http://user:pw@host` -> `http://user:<redacted>@host`, for every URI in `text`."""
    return URI_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """A line for the console or a log: URI passwords and secret environment values masked."""
    text = redact_uri(text)
    for secret in secret_values(environ):
        text = text.replace(secret, REDACTED)
    return text


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
        if isinstance(value, str):
            override = OVERRIDE.match(value)  # a command-line override as Hydra records it: ++tracking.tags.token=...
            if override and SECRET_CONFIG_KEY.match(override["key"].rsplit(".", 1)[-1].lower()):
                return f"{override['prefix']}{override['key']}={REDACTED}"
            return redact_uri(value)
        return value

    return {k: clean(str(k), v) for k, v in tree.items()}


def redact_flat(flat: Mapping[str, str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`redact_secrets` for flat `a.b.c` names (MLflow tags): the last part of a name is its key."""
    return {k: redact_secrets({k.rsplit(".", 1)[-1]: v}, environ)[k.rsplit(".", 1)[-1]] for k, v in flat.items()}
