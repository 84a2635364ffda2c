-- Next offset to load per topic partition; written in the same transaction as the rows.
CREATE TABLE IF NOT EXISTS kafka_offsets (
    topic       VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    loaded_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, "partition")
)
