-- Changelog totals the warehouse has loaded far enough to check.
SELECT count(*)
FROM changelog c
JOIN kafka_offsets k ON k.sink = $sink AND k.topic = $topic
    AND k."partition" = c."partition"
WHERE c."offset" < k.next_offset
