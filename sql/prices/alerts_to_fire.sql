-- Live alerts of the product (latest record per alert_id is not a tombstone) whose threshold
-- the average reached, and that no notification (of either side) has fired yet.
WITH latest AS (
    SELECT *
    FROM price_alert_events
    QUALIFY row_number() OVER (PARTITION BY alert_id ORDER BY "partition" DESC, "offset" DESC) = 1
)
SELECT alert_id, user_id, product_id, threshold_units, threshold_text, created_at
FROM latest
WHERE NOT deleted
  AND product_id = $product_id
  AND threshold_units <= $average_units
  AND NOT EXISTS (SELECT 1 FROM price_notifications n WHERE n.alert_id = latest.alert_id)
ORDER BY threshold_units, alert_id
