-- Every average the flow computed (one row per run, reruns included).
CREATE TABLE IF NOT EXISTS price_average_history (
    product_id    VARCHAR NOT NULL,
    as_of         TIMESTAMPTZ NOT NULL,
    window_start  TIMESTAMPTZ NOT NULL,
    trade_count   BIGINT NOT NULL,
    average_price DECIMAL(18, 8),  -- NULL: empty window
    fired         INTEGER NOT NULL,
    flow_run_id   VARCHAR,
    computed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
)
