-- The oldest waiting jobs of a processor, in submission order.
SELECT CAST(job_id AS VARCHAR), processor, job_group, priority, CAST(data AS VARCHAR), submitted_at
FROM job_ledger
WHERE processor = $processor AND processed_at IS NULL
ORDER BY submitted_at NULLS LAST, kafka_partition, kafka_offset
LIMIT $limit
