-- A retried run replaces its own rows (run_id is the flow run id, kept across retries).
DELETE FROM word_counts WHERE run_id = $run_id
