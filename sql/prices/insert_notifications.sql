INSERT INTO price_notifications BY NAME
SELECT topic, "partition", "offset", alert_id, user_id, product_id, threshold,
       CAST(average_price AS DECIMAL(18, 8)) AS average_price, window_end, fired_at, source
FROM batch
