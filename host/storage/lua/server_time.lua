-- The server's clock, as TIME answers it: {seconds, microseconds}.
-- KEYS[1] only routes the call: on a cluster, every host asks the node serving that slot,
-- so that all hosts read one clock.
return redis.call('TIME')
