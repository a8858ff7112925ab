"""Settings from ``PFORTE_*`` environment variables (and an optional ``.env``).

A wrong setting stops start-up with one clear line (``ConfigError``), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pforte.errors import ConfigError


class Settings(BaseSettings):
    """Every knob pforte has; defaults are the strictest that still work."""

    model_config = SettingsConfigDict(env_prefix="PFORTE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path("./pforte-data"), description="SQLite file, blobs, key file")
    database_url: str | None = Field(default=None, description="default: SQLite in data_dir")
    key_file: Path | None = Field(
        default=None, description="KEK key ring; default data_dir/keys/keyring.json"
    )
    erasure_ledger_file: Path | None = Field(
        default=None, description="ids of erased objects, kept outside backups; default beside the key file"
    )
    blob_dir: Path | None = Field(default=None, description="encrypted attachments; default data_dir/blobs")
    backup_recipient_file: Path | None = Field(
        default=None, description="the controller's age public key for backups; default beside the key file"
    )
    base_url: str = "http://127.0.0.1:8080"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    cookie_secure: bool = True
    session_idle_minutes: int = Field(default=30, ge=1)
    session_absolute_hours: int = Field(default=12, ge=1)
    default_locale: Literal["de", "en"] = "de"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    webhook_max_bytes: int = Field(default=3 * 1024 * 1024, ge=1024)
    media_max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    upload_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    group_commit_window_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    group_commit_max_updates: int = Field(default=2000, ge=1)
    ingest_writers: int = Field(
        default=2,
        ge=1,
        le=8,
        description="group-commit transactions in flight per process on PostgreSQL (SQLite: always 1)",
    )
    audit_receipts: bool = Field(
        default=True,
        description="one audit entry per organisation and ingest transaction with what arrived (counts)",
    )
    dek_cache_seconds: float = Field(default=300.0, ge=0.0)
    dek_cache_size: int = Field(default=10_000, ge=1)
    outbox_poll_seconds: float = Field(default=0.5, gt=0.0)
    outbox_batch: int = Field(default=50, ge=1)
    outbox_concurrency: int = Field(default=256, ge=1)  # jobs in flight per process
    outbox_lease_seconds: float = Field(default=60.0, gt=0.0)
    run_workers: bool = True
    retention_sweep_seconds: float = Field(default=3600.0, gt=0.0, description="how often the sweeper runs")
    retention_batch: int = Field(default=200, ge=1, description="conversations per sweeper transaction")
    compliance_report_seconds: float = Field(
        default=86400.0, gt=0.0, description="how often a compliance report is saved per organisation"
    )
    session_metadata_days: int = Field(
        default=7, ge=1, description="days IP and user agent of a session are kept"
    )
    failed_login_days: int = Field(default=7, ge=1, description="days failed-login records are kept")
    status_reconcile_seconds: float = Field(default=2.0, gt=0.0)
    graph_timeout_seconds: float = Field(default=15.0, gt=0.0)

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("postgresql://") or v.startswith("postgres://"):
            v = "postgresql+asyncpg://" + v.split("://", 1)[1]
        if not (v.startswith("sqlite+aiosqlite://") or v.startswith("postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql://")
        return v

    @property
    def effective_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data directory."""
        return self.database_url or f"sqlite+aiosqlite:///{(self.data_dir / 'pforte.sqlite3').resolve()}"

    @property
    def effective_key_file(self) -> Path:
        """Where the KEK key ring lives (outside the database)."""
        return self.key_file or self.data_dir / "keys" / "keyring.json"

    @property
    def effective_erasure_ledger(self) -> Path:
        """Where the erasure ledger lives: outside the database and outside every backup."""
        return self.erasure_ledger_file or self.effective_key_file.parent / "erasure-ledger.jsonl"

    @property
    def effective_backup_recipient_file(self) -> Path:
        """Where the backup recipient (an age public key, never a secret key) is stored."""
        return self.backup_recipient_file or self.effective_key_file.parent / "backup-recipient.txt"

    @property
    def effective_blob_dir(self) -> Path:
        """Where encrypted attachment blobs live."""
        return self.blob_dir or self.data_dir / "blobs"

    @property
    def is_sqlite(self) -> bool:
        """True when running on the embedded SQLite database."""
        return self.effective_database_url.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Read settings; raise ConfigError with one line naming the bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "PFORTE_" + "_".join(str(p) for p in first["loc"]).upper()
        raise ConfigError(f"invalid setting {name}: {first['msg']}") from None
