-- Events as they arrived (value as JSON text), for topics no domain table parses yet.
CREATE TABLE IF NOT EXISTS raw_events (
    topic        VARCHAR NOT NULL,
    "partition"  INTEGER NOT NULL,
    "offset"     BIGINT  NOT NULL,
    key          VARCHAR,
    value        VARCHAR,
    timestamp_ms BIGINT,
    PRIMARY KEY (topic, "partition", "offset")
)
