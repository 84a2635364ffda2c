-- The most recent run of the word_count flow.
SELECT run_id, corpus, shards, tokens, distinct_words, shard_seconds, total_seconds
FROM word_count_runs
ORDER BY finished_at DESC
LIMIT 1
