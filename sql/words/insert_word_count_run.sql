INSERT INTO word_count_runs (
    run_id, corpus, files, corpus_bytes, shards, task_runner, tokens, distinct_words,
    shard_bytes, shard_tokens, shard_seconds, count_seconds, total_seconds, finished_at
)
VALUES (
    $run_id, $corpus, $files, $corpus_bytes, $shards, $task_runner, $tokens, $distinct_words,
    $shard_bytes, $shard_tokens, $shard_seconds, $count_seconds, $total_seconds, now()
)
