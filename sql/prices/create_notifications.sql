-- Every notification on `notifications` (both sources): what has already fired.
CREATE TABLE IF NOT EXISTS price_notifications (
    topic         VARCHAR NOT NULL,
    "partition"   INTEGER NOT NULL,
    "offset"      BIGINT  NOT NULL,
    alert_id      VARCHAR NOT NULL,
    user_id       VARCHAR,
    product_id    VARCHAR,
    threshold     VARCHAR,
    average_price DECIMAL(18, 8),
    window_end    VARCHAR,
    fired_at      VARCHAR,
    source        VARCHAR,
    PRIMARY KEY (topic, "partition", "offset")
)
