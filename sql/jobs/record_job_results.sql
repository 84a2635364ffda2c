-- Results of the registered `results` frame; a job that already has a result keeps it.
UPDATE job_ledger
SET status = results.status,
    result_data = CAST(results.result_data AS JSON),
    processed_at = results.processed_at,
    published = false
FROM results
WHERE job_ledger.job_id = CAST(results.job_id AS UUID)
  AND job_ledger.processed_at IS NULL
