-- A retried run replaces its own row (run_id is the flow run id, kept across retries).
DELETE FROM word_count_runs WHERE run_id = $run_id
