UPDATE job_ledger
SET published = true
WHERE processor = $processor AND processed_at IS NOT NULL AND NOT published
