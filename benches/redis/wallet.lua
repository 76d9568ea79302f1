-- tally's Redis baseline: one strict, idempotent wallet debit, done in one Lua
-- script (run.sh loads it with SCRIPT LOAD and calls it with EVALSHA).
--
--   KEYS[1]  the event key: the request's idempotency key
--   KEYS[2]  the wallet key: its balance, an integer in minor units
--   ARGV[1]  the amount, a positive integer in minor units
--
-- Returns
--   'ok'            the balance was decremented and the event recorded
--   'insufficient'  the wallet does not exist or holds less than the amount;
--                   nothing was debited, and the refusal is recorded
--   <stored reply>  the event key exists: this is a repeat, answered with the
--                   first call's reply ('ok' or 'insufficient'); nothing changes
--   an error        the amount is not a positive integer; nothing changes
--
-- The event is recorded with a TTL of 24 h (SET key reply EX 86400): the
-- idempotency window. A script runs atomically (no other command runs between
-- its GET and its DECRBY), so concurrent debits of one wallet never overdraw
-- it. With appendfsync always the script's writes are in the AOF, fsynced,
-- before its reply is sent.
local amount = tonumber(ARGV[1])
if amount == nil or amount <= 0 or amount ~= math.floor(amount) or amount >= 2^53 then
    return redis.error_reply('ERR debit amount must be a positive integer, got ' .. tostring(ARGV[1]))
end

local seen = redis.call('GET', KEYS[1])
if seen then
    return seen
end

local reply = 'insufficient'
local balance = tonumber(redis.call('GET', KEYS[2]))
if balance ~= nil and balance >= amount then
    redis.call('DECRBY', KEYS[2], amount)
    reply = 'ok'
end
redis.call('SET', KEYS[1], reply, 'EX', 86400)
return reply
