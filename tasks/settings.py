"""The one settings object: every knob comes from the environment or `.env`.

Field names map to upper-case environment variables (`kafka_bootstrap_servers` ->
`KAFKA_BOOTSTRAP_SERVERS`). `PREFECT_API_URL` and the other `PREFECT_*` variables are
left to Prefect itself.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    # --- Kafka connection -------------------------------------------------------------
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_client_id: str = "hybrid-workflows"
    kafka_timeout_s: float = Field(default=15.0, gt=0, description="connect / metadata timeout")
    kafka_default_partitions: int = Field(default=3, ge=1)
    kafka_replication_factor: int = Field(default=1, ge=1)
    dlq_suffix: str = ".dlq"

    # --- Topics (DESIGN.md defaults) ------------------------------------------------------
    trades_topic: str = "trades"
    price_alerts_topic: str = "price-alerts"
    notifications_topic: str = "notifications"
    transactions_topic: str = "transactions"
    transaction_alerts_topic: str = "transaction-alerts"
    transaction_totals_changelog_topic: str = "transaction-totals-changelog"
    jobs_topic_prefix: str = "jobs"
    job_results_topic_prefix: str = "job-results"

    # --- Warehouse (DuckDB) ---------------------------------------------------------------
    warehouse_path: Path = Path("data/warehouse.duckdb")
    warehouse_lock_timeout_s: float = Field(
        default=30.0, ge=0, description="how long to retry while another process holds the lock"
    )
    warehouse_concurrency_limit: str = "warehouse-writer"
    loader_batch_size: int = Field(default=50_000, ge=1)

    # --- Domain rules -----------------------------------------------------------------------
    price_window_minutes: int = Field(default=10, ge=1)
    deposit_alert_threshold: Decimal = Decimal("2000")
    withdrawal_alert_threshold: Decimal = Decimal("-2000")

    def dlq_topic(self, topic: str) -> str:
        """The dead-letter topic for `topic`."""
        return f"{topic}{self.dlq_suffix}"

    def jobs_topic(self, processor: str, priority: str) -> str:
        return f"{self.jobs_topic_prefix}.{processor}.{priority.lower()}"

    def job_results_topic(self, processor: str) -> str:
        return f"{self.job_results_topic_prefix}.{processor}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
