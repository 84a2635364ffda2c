-- Results recorded but not yet confirmed on job-results (a run stopped in between).
SELECT CAST(job_id AS VARCHAR), status, CAST(result_data AS VARCHAR), processed_at
FROM job_ledger
WHERE processor = $processor AND processed_at IS NOT NULL AND NOT published
ORDER BY processed_at
