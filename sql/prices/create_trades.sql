-- Trades loaded from `trades` (validated by tasks.prices.parse_trade); prices exact DECIMAL.
CREATE TABLE IF NOT EXISTS price_trades (
    topic       VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    "offset"    BIGINT  NOT NULL,
    trade_id    BIGINT  NOT NULL,
    product_id  VARCHAR NOT NULL,
    price       DECIMAL(18, 8) NOT NULL,
    size        DECIMAL(18, 8) NOT NULL,
    side        VARCHAR NOT NULL,
    time_us     BIGINT  NOT NULL,  -- event time, microseconds since the epoch (the window's key)
    time        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, "partition", "offset")
)
