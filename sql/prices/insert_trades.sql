INSERT INTO price_trades BY NAME
SELECT topic, "partition", "offset", trade_id, product_id,
       CAST(price AS DECIMAL(18, 8)) AS price, CAST(size AS DECIMAL(18, 8)) AS size,
       side, time_us, time
FROM batch
