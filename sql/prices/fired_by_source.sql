SELECT source, count(*) AS notifications FROM price_notifications GROUP BY source ORDER BY source
