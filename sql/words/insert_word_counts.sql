-- The join: the sum of the shard tables (registered relation `shard_counts`: word, count).
INSERT INTO word_counts (run_id, word, count)
SELECT $run_id, word, CAST(sum(count) AS BIGINT)
FROM shard_counts
GROUP BY word
