-- Rows of the loader's `batch`; a job id already in the ledger (a resubmit) is kept as it is.
INSERT OR IGNORE INTO job_ledger BY NAME
SELECT
    CAST(job_id AS UUID) AS job_id,
    processor,
    job_group,
    priority,
    CAST(data AS JSON) AS data,
    submitted_at,
    topic,
    kafka_partition,
    kafka_offset
FROM batch
QUALIFY row_number() OVER (PARTITION BY job_id ORDER BY kafka_partition, kafka_offset) = 1
