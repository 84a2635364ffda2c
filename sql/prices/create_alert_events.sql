-- Every record of the compacted `price-alerts` topic; the latest per alert_id is its state
-- (deleted = a tombstone: fired or removed).
CREATE TABLE IF NOT EXISTS price_alert_events (
    topic           VARCHAR NOT NULL,
    "partition"     INTEGER NOT NULL,
    "offset"        BIGINT  NOT NULL,
    alert_id        VARCHAR NOT NULL,
    deleted         BOOLEAN NOT NULL,
    user_id         VARCHAR,
    product_id      VARCHAR,
    threshold       DECIMAL(18, 8),
    threshold_units BIGINT,
    threshold_text  VARCHAR,
    created_at      VARCHAR,
    PRIMARY KEY (topic, "partition", "offset")
)
