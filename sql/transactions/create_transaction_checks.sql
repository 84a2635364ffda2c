-- One row per run of the batch check.
CREATE TABLE IF NOT EXISTS transaction_checks (
    checked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    topic        VARCHAR NOT NULL,
    loaded       BIGINT NOT NULL,
    rejected     BIGINT NOT NULL,
    users        BIGINT NOT NULL,
    compared     BIGINT NOT NULL,
    mismatches   BIGINT NOT NULL
)
