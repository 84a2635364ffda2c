"""The one settings object: every knob comes from the environment or `.env`.

Field names map to upper-case environment variables (`kafka_bootstrap_servers` ->
`KAFKA_BOOTSTRAP_SERVERS`). `PREFECT_API_URL` and the other `PREFECT_*` variables are
left to Prefect itself.
"""

from __future__ import annotations

import ssl
import typing
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
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

    # --- Topics (the documented defaults) ------------------------------------------------------
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

    # --- stream workers (all) ---------------------------------------------------
    # Each worker process writes `<worker>.<instance>.json` here (state, assigned partitions,
    # counts, lag) when its assignment changes and with every progress line; unset: none.
    stream_status_dir: Path | None = None
    # Prometheus metrics of a worker daemon on this port (`--metrics-port`); under
    # `python -m stream_workers all`, consecutive ports from it. Unset: no endpoint.
    stream_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Prefect events (started / stopped / rebalanced / heartbeat / price_alert.fired), sent
    # when PREFECT_API_URL is set; at most `stream_events_buffer` wait (when full, the
    # oldest is dropped).
    stream_events_enabled: bool = True
    stream_events_buffer: int = Field(default=1000, ge=1)
    stream_heartbeat_interval_s: float = Field(default=30.0, gt=0)
    # The automation that runs `price-averages` when no price-alerts heartbeat arrived for
    # this long (the batch side covers for a stopped stream side).
    stream_heartbeat_timeout_s: float = Field(default=120.0, ge=10)
    log_format: Literal["text", "json"] = "text"

    # --- prices ----------------------------------------------------------------
    price_alerts_group: str = "price-alerts"  # worker consumer group
    # Firing transactions use `<prefix>-<trades topic>-<partition>`: the worker and the batch
    # flow share these ids, so Kafka's fencing serialises who may fire a product's alerts.
    price_fire_transactional_prefix: str = "price-alerts-fire"
    price_alerts_batch_size: int = Field(default=5000, ge=1, description="worker: max poll batch")
    price_alerts_txn_timeout_ms: int = Field(default=10_000, ge=1_000)
    price_alerts_session_timeout_ms: int = Field(default=10_000, ge=6_000)
    # How far Kafka record timestamps may trail trade event times when the worker rebuilds
    # its windows by seeking `trades` with offsets_for_times.
    price_rebuild_margin_s: float = Field(default=60, ge=0)
    price_fence_backoff_s: float = Field(
        default=1.0, ge=0, description="worker: pause after being fenced by a batch firing"
    )
    price_fire_attempts: int = Field(default=5, ge=1, description="flow: tries when fenced")

    # --- transactions ----------------------------------------------------------
    transaction_alerts_group: str = "transaction-alerts"  # consumer group + transactional id prefix
    transaction_amount_scale: int = Field(default=2, ge=0, le=6, description="decimal places")
    transaction_max_abs_amount: Decimal = Field(
        default=Decimal("1000000000"), gt=0, description="larger amounts go to the DLQ as absurd"
    )
    transaction_alerts_batch_size: int = Field(default=20_000, ge=1, description="max poll batch")
    # 6 s is the broker's group.min.session.timeout.ms: how soon others take over a dead worker.
    transaction_alerts_session_timeout_ms: int = Field(default=10_000, ge=6_000)
    # How long a dead worker's open transaction blocks read_committed readers (Kafka
    # Streams uses 10 s for the same reason); a restart with the same --instance aborts it.
    transaction_alerts_txn_timeout_ms: int = Field(default=10_000, ge=1_000)

    # --- words -----------------------------------------------------------------
    # Where the shard tasks of `word_count` run: a thread pool in the flow's process, or Dask.
    word_count_task_runner: Literal["threads", "dask"] = "threads"
    # An existing Dask scheduler (e.g. tcp://10.0.0.5:8786; its workers must see the corpus
    # files); unset: a temporary local cluster of `word_count_dask_workers` workers.
    word_count_dask_address: str | None = None
    word_count_dask_workers: int = Field(default=2, ge=1)
    word_count_dask_processes: bool = True  # local cluster: worker processes (else threads)
    word_count_max_shards: int = Field(default=256, ge=1, description="flow: refuse more shards")

    # --- jobs ------------------------------------------------------------------
    jobs_batch_size: int = Field(default=500, ge=1, description="submitter: jobs per batch")
    jobs_batch_latency_ms: float = Field(
        default=20, ge=0, description="submitter: longest a batch's first job waits for more"
    )
    jobs_timeout_realtime_s: float = Field(default=10, gt=0)
    jobs_timeout_normal_s: float = Field(default=60, gt=0)
    # SLOW jobs are drained by the flow every 5 minutes: callers mostly use submit_async.
    jobs_timeout_slow_s: float = Field(default=900, gt=0)
    jobs_processor_max_batch: int = Field(default=500, ge=1, description="jobs per transaction")
    jobs_normal_slice_ms: float = Field(
        default=50, gt=0, description="processor: NORMAL work per transaction"
    )
    jobs_results_lookback_h: float = Field(
        default=24, gt=0, description="processor: job ids with results rebuilt from this far back"
    )
    jobs_session_timeout_ms: int = Field(default=10_000, ge=6_000)
    jobs_txn_timeout_ms: int = Field(default=10_000, ge=1_000)
    jobs_slow_batch_size: int = Field(default=200, ge=1, description="flow: SLOW jobs per batch")
    # The daemon's NORMAL lane runs this much nicer than its REALTIME lane (0 to 19).
    jobs_normal_niceness: int = Field(default=10, ge=0, le=19)
    payments_upstream_path: Path | None = None  # default: payments-upstream.sqlite by the warehouse
    payments_upstream_rate_per_s: float = Field(default=1000, gt=0, description="token bucket")
    payments_upstream_burst: int = Field(default=50, ge=1)

    @field_validator("kafka_ssl_cafile")
    @classmethod
    def _ca_file_is_readable(cls, path: Path | None) -> Path | None:
        """A CA bundle clients can load: checked here, once, so no client retries on it."""
        if path is None:
            return None
        try:
            ssl.create_default_context(cafile=str(path))
        except ssl.SSLError:
            raise ValueError(f"{str(path)!r} holds no PEM CA certificate") from None
        except OSError as error:
            raise ValueError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
        return path

    @model_validator(mode="after")
    def _sasl_settings_agree(self) -> Settings:
        """SASL settings that the protocol uses, complete for the mechanism."""
        protocol, mechanism = self.kafka_security_protocol, self.kafka_sasl_mechanism
        if protocol.startswith("SASL_") and mechanism is None:
            choices = ", ".join(typing.get_args(SaslMechanism))
            raise ValueError(
                f"KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_SASL_MECHANISM (one of {choices})"
            )
        if mechanism is not None and not protocol.startswith("SASL_"):
            raise ValueError(
                f"KAFKA_SASL_MECHANISM={mechanism} is set but KAFKA_SECURITY_PROTOCOL={protocol} "
                "does not use SASL (SASL_PLAINTEXT or SASL_SSL do)"
            )
        if mechanism in {"PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"}:
            missing = [name for name, value in (("KAFKA_SASL_USERNAME", self.kafka_sasl_username),
                                                ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password))
                       if not value]  # fmt: skip
            if missing:
                raise ValueError(f"KAFKA_SASL_MECHANISM={mechanism} needs {' and '.join(missing)}")
        return self

    def jobs_processor_group(self, processor: str) -> str:
        """Consumer group prefix (+ `.realtime` / `.normal`) and transactional id prefix of a
        processor daemon."""
        return f"{self.jobs_topic_prefix}.{processor}.processor"

    def payments_upstream_ledger(self) -> Path:
        """The simulated payments upstream's own SQLite ledger file."""
        default = self.warehouse_path.parent / "payments-upstream.sqlite"
        return self.payments_upstream_path or default

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
