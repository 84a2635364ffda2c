-- tasks.prices.window_average_units in DuckDB: the exact DECIMAL sum of the prices with
-- $start_us <= time_us <= $end_us, divided by the count in integer arithmetic and rounded
-- half-to-even to 8 places (DECIMAL / DECIMAL would go through DOUBLE). Empty: NULL average.
-- reached_units = floor(sum / count) (tasks.prices.reached_units) is what alerts compare to.
WITH w AS (
    SELECT count(*) AS trade_count,
           CAST(coalesce(sum(price), 0) * 100000000 AS HUGEINT) AS sum_units
    FROM price_trades
    WHERE product_id = $product_id AND time_us BETWEEN $start_us AND $end_us
), q AS (
    SELECT trade_count, sum_units,
           sum_units // greatest(trade_count, 1) AS quot,
           sum_units % greatest(trade_count, 1) AS rem
    FROM w
), r AS (
    SELECT trade_count, sum_units,
           CASE WHEN trade_count = 0 THEN NULL
                WHEN 2 * rem > trade_count OR (2 * rem = trade_count AND quot % 2 = 1) THEN quot + 1
                ELSE quot END AS average_units,
           CASE WHEN trade_count = 0 THEN NULL ELSE quot END AS reached_units
    FROM q
)
SELECT trade_count, sum_units, average_units,
       CAST(average_units AS DECIMAL(38, 0)) * CAST(0.00000001 AS DECIMAL(18, 8)) AS average_price,
       reached_units
FROM r
