"""The state folder: layout, credentials file and the ``services.json`` record.

Secrets live only in ``credentials.env`` and the SeaweedFS identity file, both created 0600 with
``os.open`` so there is no window in which they are readable by others. ``services.json`` holds
PIDs, ports and endpoints only.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bockd.atomic import write_text
from bockd.platform.credentials import ACCESS_KEY_ID, SECRET_ACCESS_KEY
from bockd.platform.services.errors import ServiceError

BUCKET = "bockd"
CREDENTIALS_FILE = "credentials.env"
S3_IDENTITY_FILE = "s3-identities.json"
RECORD_FILE = "services.json"


@dataclass(frozen=True)
class Layout:
    """Where everything lives under one state folder."""

    root: Path

    @property
    def credentials(self) -> Path:
        return self.root / CREDENTIALS_FILE

    @property
    def s3_identities(self) -> Path:
        return self.root / S3_IDENTITY_FILE

    @property
    def record(self) -> Path:
        return self.root / RECORD_FILE

    @property
    def seaweed_dir(self) -> Path:
        return self.root / "seaweedfs"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, service: str) -> Path:
        return self.logs / f"{service}.log"

    def make_dirs(self) -> None:
        for d in (self.root, self.seaweed_dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)  # keep the secret out of reprs, tracebacks and logs


def _write_private(path: Path, text: str) -> None:
    """A file that is 0600 from its creation (a fresh O_EXCL temporary file: never one someone else made)."""
    write_text(path, text, mode=0o600)


def load_or_create_credentials(layout: Layout) -> Credentials:
    """Reuse the credentials of the state folder (the data in S3 belongs to them) or make new ones."""
    if layout.credentials.exists():
        return read_credentials(layout)
    creds = Credentials(access_key="bockd-" + secrets.token_hex(8), secret_key=secrets.token_urlsafe(32))
    _write_private(
        layout.credentials,
        f"{ACCESS_KEY_ID}={creds.access_key}\n{SECRET_ACCESS_KEY}={creds.secret_key}\n",
    )
    return creds


def read_credentials(layout: Layout) -> Credentials:
    values: dict[str, str] = {}
    try:
        text = layout.credentials.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ServiceError(f"no credentials file at {layout.credentials}: run `bockd services up`") from None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return Credentials(values.get(ACCESS_KEY_ID, ""), values.get(SECRET_ACCESS_KEY, ""))


def write_s3_identities(layout: Layout, creds: Credentials) -> None:
    """SeaweedFS S3 identity config: once any identity exists, unsigned or wrongly signed requests fail."""
    config = {
        "identities": [
            {
                "name": "bockd",
                "credentials": [{"accessKey": creds.access_key, "secretKey": creds.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _write_private(layout.s3_identities, json.dumps(config, indent=2))


@dataclass(frozen=True)
class ServiceRecord:
    """One started process, as recorded in ``services.json``."""

    name: str
    pid: int
    port: int
    endpoint: str
    log: str
    ports: dict[str, int] = field(default_factory=dict)  # internal ports (SeaweedFS master, filer, ...)


@dataclass(frozen=True)
class ServicesInfo:
    """What a client needs to reach the running stack. Credentials are read from the state folder."""

    state_dir: Path
    s3: ServiceRecord
    mlflow: ServiceRecord
    bucket: str = BUCKET

    @property
    def s3_endpoint(self) -> str:
        return self.s3.endpoint

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow.endpoint

    def credentials(self) -> Credentials:
        return read_credentials(Layout(self.state_dir))

    def env(self) -> dict[str, str]:
        creds = self.credentials()
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "BOCKD_S3_ENDPOINT": self.s3_endpoint,
            ACCESS_KEY_ID: creds.access_key,
            SECRET_ACCESS_KEY: creds.secret_key,
        }

    def to_json(self) -> str:
        return json.dumps(
            {"bucket": self.bucket, "s3": asdict(self.s3), "mlflow": asdict(self.mlflow)}, indent=2
        )


def save_record(layout: Layout, info: ServicesInfo) -> None:
    write_text(layout.record, info.to_json() + "\n")


def load_record(layout: Layout) -> ServicesInfo | None:
    try:
        data = json.loads(layout.record.read_text(encoding="utf-8"))
        return ServicesInfo(
            state_dir=layout.root,
            s3=ServiceRecord(**data["s3"]),
            mlflow=ServiceRecord(**data["mlflow"]),
            bucket=data.get("bucket", BUCKET),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a torn or foreign record: treat as "nothing running we can vouch for"
