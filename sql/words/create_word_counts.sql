-- One row per word per run of the word_count flow: the join of the shard tables.
CREATE TABLE IF NOT EXISTS word_counts (
    run_id VARCHAR NOT NULL,
    word   VARCHAR NOT NULL,
    count  BIGINT  NOT NULL,
    PRIMARY KEY (run_id, word)
)
