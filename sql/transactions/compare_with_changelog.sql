-- Mismatches between the stream's totals (registered relation `changelog`: the latest
-- value per user of the changelog topic) and the warehouse. Each changelog total covers
-- the user's transactions up to its source `offset` in its partition, so the comparison
-- sums exactly those: neither side's lag shows up as a mismatch. Changelog totals the
-- warehouse has not loaded that far yet are skipped.
WITH loaded AS (
    SELECT "partition", next_offset FROM kafka_offsets
    WHERE sink = $sink AND topic = $topic
),
stream AS (
    SELECT c."user", c."partition", c."offset", c.transactions,
           CAST(c.total AS DECIMAL(38, 6)) AS total
    FROM changelog c JOIN loaded l ON l."partition" = c."partition"
    WHERE c."offset" < l.next_offset
),
batch AS (
    SELECT t."user", sum(t.amount) AS total, count(*) AS transactions
    FROM transactions t
    JOIN stream s ON s."user" = t."user" AND s."partition" = t."partition" AND t."offset" <= s."offset"
    WHERE t.topic = $topic
    GROUP BY t."user"
),
progress AS (
    SELECT "partition", max("offset") AS upto FROM changelog GROUP BY "partition"
),
missing AS (
    -- The stream went past these users' transactions (same partition, later offset)
    -- yet has no total for them.
    SELECT t."user", sum(t.amount) AS total, count(*) AS transactions
    FROM transactions t JOIN progress p ON p."partition" = t."partition"
    WHERE t.topic = $topic AND t."offset" <= p.upto
      AND NOT EXISTS (SELECT 1 FROM changelog c WHERE c."user" = t."user")
    GROUP BY t."user"
)
SELECT s."user", s.total AS stream_total, b.total AS batch_total,
       s.transactions AS stream_transactions, b.transactions AS batch_transactions,
       'totals differ' AS problem
FROM stream s LEFT JOIN batch b ON b."user" = s."user"
WHERE b.total IS DISTINCT FROM s.total OR b.transactions IS DISTINCT FROM s.transactions
UNION ALL
SELECT "user", NULL, total, NULL, transactions, 'no total on the changelog'
FROM missing
ORDER BY 1
