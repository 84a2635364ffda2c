INSERT INTO price_average_history
    (product_id, as_of, window_start, trade_count, average_price, fired, flow_run_id)
VALUES ($product_id, $as_of, $window_start, $trade_count, CAST($average_price AS DECIMAL(18, 8)),
        $fired, $flow_run_id)
