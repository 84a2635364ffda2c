-- Per-user running totals over every loaded transaction of the topic.
CREATE OR REPLACE TABLE transaction_totals AS
SELECT "user", sum(amount) AS total, count(*) AS transactions, max("time") AS last_time
FROM transactions
WHERE topic = $topic
GROUP BY "user"
