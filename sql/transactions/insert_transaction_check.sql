INSERT INTO transaction_checks (topic, loaded, rejected, users, compared, mismatches)
VALUES ($topic, $loaded, $rejected, (SELECT count(*) FROM transaction_totals), $compared, $mismatches)
RETURNING users
