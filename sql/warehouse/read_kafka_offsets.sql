SELECT "partition", next_offset FROM kafka_offsets WHERE sink = $sink AND topic = $topic
