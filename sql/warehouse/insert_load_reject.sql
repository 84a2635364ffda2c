INSERT INTO load_rejects (topic, "partition", "offset", value, reason) VALUES (?, ?, ?, ?, ?)
