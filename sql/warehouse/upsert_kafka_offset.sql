INSERT INTO kafka_offsets (topic, "partition", next_offset) VALUES (?, ?, ?)
ON CONFLICT (topic, "partition") DO UPDATE SET next_offset = excluded.next_offset, loaded_at = now()
