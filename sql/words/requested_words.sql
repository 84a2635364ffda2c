-- The counts (0 when absent) and ranks of the requested words in one run, in request order.
WITH ranked AS (
    SELECT word, count, rank() OVER (ORDER BY count DESC) AS rank
    FROM word_counts
    WHERE run_id = $run_id
),
requested AS (
    SELECT unnest($words::VARCHAR[]) AS word, generate_subscripts($words::VARCHAR[], 1) AS position
)
SELECT requested.word, coalesce(ranked.count, 0) AS count, ranked.rank
FROM requested
LEFT JOIN ranked USING (word)
ORDER BY requested.position
