-- The most recent batch check (for the demo summary and dashboards).
SELECT users, compared, mismatches, checked_at FROM transaction_checks ORDER BY checked_at DESC LIMIT 1
