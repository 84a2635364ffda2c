-- Jobs per status of a processor's ledger, each with its oldest job (QUEUED: the oldest waiting).
SELECT
    status,
    count(*) AS jobs,
    CAST(arg_min(job_id, coalesce(submitted_at, loaded_at)) AS VARCHAR) AS oldest_job_id,
    min(coalesce(submitted_at, loaded_at)) AS oldest_submitted_at
FROM job_ledger
WHERE processor = $processor
GROUP BY status
ORDER BY status
