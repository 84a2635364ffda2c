-- `batch`: validated records (tasks.transactions); amounts are exact decimal strings.
INSERT INTO transactions BY NAME
SELECT topic, "partition", "offset", "user",
       CAST(amount AS DECIMAL(38, 6)) AS amount,
       CAST("time" AS TIMESTAMPTZ) AS "time"
FROM batch
