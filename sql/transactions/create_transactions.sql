-- Valid transactions as loaded from Kafka (exactly once: offsets commit with the rows).
CREATE TABLE IF NOT EXISTS transactions (
    topic       VARCHAR NOT NULL,
    "partition" INTEGER NOT NULL,
    "offset"    BIGINT  NOT NULL,
    "user"      VARCHAR NOT NULL,
    amount      DECIMAL(38, 6) NOT NULL,
    "time"      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (topic, "partition", "offset")
)
