-- One row per run of the word_count flow; list columns hold one value per shard.
CREATE TABLE IF NOT EXISTS word_count_runs (
    run_id         VARCHAR PRIMARY KEY,
    corpus         VARCHAR     NOT NULL,
    files          VARCHAR[]   NOT NULL,
    corpus_bytes   BIGINT      NOT NULL,
    shards         INTEGER     NOT NULL,
    task_runner    VARCHAR     NOT NULL,
    tokens         BIGINT      NOT NULL,
    distinct_words BIGINT      NOT NULL,
    shard_bytes    BIGINT[]    NOT NULL,
    shard_tokens   BIGINT[]    NOT NULL,
    shard_seconds  DOUBLE[]    NOT NULL,
    count_seconds  DOUBLE      NOT NULL,
    total_seconds  DOUBLE      NOT NULL,
    finished_at    TIMESTAMPTZ NOT NULL
)
