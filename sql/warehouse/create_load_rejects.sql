-- Records the loader could not parse or validate, with the reason (the batch side's DLQ).
CREATE TABLE IF NOT EXISTS load_rejects (
    topic       VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    "offset"    BIGINT  NOT NULL,
    value       VARCHAR,
    reason      VARCHAR NOT NULL,
    rejected_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition", "offset")
)
