-- Live alerts of the product (latest record per alert_id is not a tombstone) whose threshold
-- the exact average reached, and that no notification (of either side) has fired yet.
-- $reached_units = floor(sum_units / count) (window_average.sql): for whole-unit thresholds,
-- threshold <= floor(sum / count) iff threshold * count <= sum (never the rounded average).
WITH latest AS (
    SELECT *
    FROM price_alert_events
    QUALIFY row_number() OVER (PARTITION BY alert_id ORDER BY "partition" DESC, "offset" DESC) = 1
)
SELECT alert_id, user_id, product_id, threshold_units, threshold_text, created_at
FROM latest
WHERE NOT deleted
  AND product_id = $product_id
  AND threshold_units <= $reached_units
  AND NOT EXISTS (SELECT 1 FROM price_notifications n WHERE n.alert_id = latest.alert_id)
ORDER BY threshold_units, alert_id
