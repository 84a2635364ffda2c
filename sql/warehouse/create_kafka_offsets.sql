-- Next offset to load per sink (the insert statement that consumes the topic) and topic
-- partition; written in the same transaction as the rows. Two flows loading the same
-- topic into different tables keep separate offsets.
CREATE TABLE IF NOT EXISTS kafka_offsets (
    sink        VARCHAR NOT NULL,
    topic       VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    loaded_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sink, topic, "partition")
)
