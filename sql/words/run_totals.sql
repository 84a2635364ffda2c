-- Tokens and distinct words of one run, as written.
SELECT CAST(coalesce(sum(count), 0) AS BIGINT) AS tokens, count(*) AS distinct_words
FROM word_counts
WHERE run_id = $run_id
