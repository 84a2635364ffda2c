INSERT INTO kafka_offsets (sink, topic, "partition", next_offset) VALUES (?, ?, ?, ?)
ON CONFLICT (sink, topic, "partition") DO UPDATE SET next_offset = excluded.next_offset, loaded_at = now()
