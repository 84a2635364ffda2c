-- The SLOW job ledger: one row per job id, loaded exactly once from jobs.<processor>.slow;
-- status QUEUED until the flow records its result (then published to job-results).
CREATE TABLE IF NOT EXISTS job_ledger (
    job_id UUID PRIMARY KEY,
    processor VARCHAR NOT NULL,
    job_group VARCHAR NOT NULL,
    priority VARCHAR NOT NULL,
    data JSON NOT NULL,
    submitted_at TIMESTAMPTZ,
    topic VARCHAR NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    loaded_at TIMESTAMPTZ NOT NULL DEFAULT current_timestamp,
    status VARCHAR NOT NULL DEFAULT 'QUEUED',
    result_data JSON,
    processed_at TIMESTAMPTZ,
    published BOOLEAN NOT NULL DEFAULT false
)
