SELECT "partition", next_offset FROM kafka_offsets WHERE topic = $topic
