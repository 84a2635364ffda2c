SELECT topic, count(*) AS events, min(timestamp_ms) AS first_ms, max(timestamp_ms) AS last_ms
FROM raw_events GROUP BY topic ORDER BY topic
