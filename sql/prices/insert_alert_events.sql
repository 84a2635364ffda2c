INSERT INTO price_alert_events BY NAME
SELECT topic, "partition", "offset", alert_id, deleted, user_id, product_id,
       CAST(threshold_text AS DECIMAL(18, 8)) AS threshold, threshold_units, threshold_text,
       created_at
FROM batch
