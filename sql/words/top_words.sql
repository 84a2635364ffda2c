-- The most frequent words of one run (ties by word), with their rank.
SELECT word, count, rank() OVER (ORDER BY count DESC) AS rank
FROM word_counts
WHERE run_id = $run_id
ORDER BY count DESC, word
LIMIT $limit
