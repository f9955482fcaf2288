-- One op of one holder on one key, applied atomically (see valkey.rs for the key layout).
--
-- KEYS: 1 aura:{K} (epoch, limit, spent:<period>, base:<period>, squeeze), 2 :lease,
--       3 :until, 4 :seq, 5 :grant, 6 :seen (holder -> value, each).
-- ARGV:  1 holder          2 seq             3 configured limit   4 period (the holder's)
--        5 from_lease      6 returned        7 need               8 parts (0: no ask)
--        9 lease ttl ms   10 holders kept   11 forget holders after ms
--       12 squeeze ms     13 the account's epoch as the holder heard it ('': none)
--       14 close (1: drop the holder's lease after this op, whatever it was)
--       15 forget (1: drop the account if nothing is left in it)
--       16 restore held (-1: none)  17 restore floor period  18 restore floor (-1: none)
--       19 restore limit (-1: none) 20 periods of history kept (0: spend keeps nothing alive)
--       21 idle ttl ms
--       22 when the holder's period began (unix seconds; 0: spend has no period)
--       23 n, then n pairs (period, spent)
-- Returns {granted, limit, spent in ARGV[4]'s period, leased, squeezed, lost, epoch, the
-- holder's lease after the op}.
--
-- Spend reaches HINCRBY as the strings it came in (exact to 2^63); sums and comparisons use
-- Lua numbers (doubles), exact below 2^53 nano-dollars, which Aura's largest limit keeps every
-- total under.

local holder = ARGV[1]
local seq = tonumber(ARGV[2])
local period = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Every key is read before anything is written: a key another program clobbered (WRONGTYPE)
-- fails the op before it changed anything, so a refused op was not half applied.
for i = 1, 6 do
  redis.call('HEXISTS', KEYS[i], '')
end

-- The account's epoch: made with the account. A holder that heard another one holds
-- knowledge of an account the store lost: it is restored before anything is granted.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = t[1] .. '.' .. t[2]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local lost = 0
if ARGV[13] ~= '' and ARGV[13] ~= epoch then
  lost = 1
end

-- The layout before spend was kept per period: one 'spent' and its 'period'.
local old = redis.call('HGET', KEYS[1], 'spent')
if old then
  local p = redis.call('HGET', KEYS[1], 'period') or ARGV[4]
  redis.call('HINCRBY', KEYS[1], 'spent:' .. p, old)
  redis.call('HDEL', KEYS[1], 'spent', 'period')
end

-- Lapsed leases go back; what is left sums to the key's leased total.
local untils = redis.call('HGETALL', KEYS[3])
for i = 1, #untils, 2 do
  if tonumber(untils[i + 1]) < now then
    redis.call('HDEL', KEYS[2], untils[i])
    redis.call('HDEL', KEYS[3], untils[i])
  end
end
local leased = 0
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  leased = leased + tonumber(leases[i + 1])
end

local limit = tonumber(redis.call('HGET', KEYS[1], 'limit')) or tonumber(ARGV[3])
local granted = 0
local last = tonumber(redis.call('HGET', KEYS[4], holder)) or 0
local new_period = false
local restoring = lost == 1

-- An account the store lost gets back what the holder knew (idempotent: a limit only where
-- none is set, a spend floor only above the largest one given so far, floors never adding up).
if restoring and tonumber(ARGV[19]) >= 0 and tonumber(ARGV[19]) ~= tonumber(ARGV[3])
    and redis.call('HEXISTS', KEYS[1], 'limit') == 0 then
  redis.call('HSET', KEYS[1], 'limit', ARGV[19])
  limit = tonumber(ARGV[19])
end
if restoring and tonumber(ARGV[18]) >= 0 then
  local fp = ARGV[17]
  local floor = tonumber(ARGV[18])
  local base = tonumber(redis.call('HGET', KEYS[1], 'base:' .. fp)) or 0
  if floor > base then
    redis.call('HINCRBY', KEYS[1], 'spent:' .. fp, floor - base)
    redis.call('HSET', KEYS[1], 'base:' .. fp, floor)
  end
end

if seq > last then
  local n = tonumber(ARGV[23])
  for i = 0, n - 1 do
    local p = ARGV[24 + 2 * i]
    local amount = ARGV[25 + 2 * i]
    if tonumber(amount) > 0 then
      if redis.call('HEXISTS', KEYS[1], 'spent:' .. p) == 0 then
        new_period = true
      end
      redis.call('HINCRBY', KEYS[1], 'spent:' .. p, amount)
    end
  end
  local before = tonumber(redis.call('HGET', KEYS[2], holder)) or 0
  local counted = before
  if restoring and tonumber(ARGV[16]) >= 0 then
    counted = tonumber(ARGV[16])
  end
  local held = math.max(counted - tonumber(ARGV[5]) - tonumber(ARGV[6]), 0)
  leased = leased - before + held
  local parts = tonumber(ARGV[8])
  if parts > 0 then
    local need = tonumber(ARGV[7])
    local spent_now = tonumber(redis.call('HGET', KEYS[1], 'spent:' .. ARGV[4])) or 0
    local unleased = limit - spent_now - leased
    if unleased >= need then
      granted = need + math.floor((unleased - need) / parts)
    elseif need > 0 and leased > held then
      -- Other workers hold what this ask needs: ask them to hand back what they do not use.
      redis.call('HSET', KEYS[1], 'squeeze', now + tonumber(ARGV[12]))
    end
  end
  held = held + granted
  leased = leased + granted
  if held > 0 then
    redis.call('HSET', KEYS[2], holder, held)
    redis.call('HSET', KEYS[3], holder, now + tonumber(ARGV[9]))
  else
    redis.call('HDEL', KEYS[2], holder)
    redis.call('HDEL', KEYS[3], holder)
  end
  redis.call('HSET', KEYS[4], holder, seq)
  redis.call('HSET', KEYS[5], holder, granted)
  redis.call('HSET', KEYS[6], holder, now)
  -- Only when a new holder appears (a node started): the scan is O(holders).
  if last == 0 and redis.call('HLEN', KEYS[6]) > tonumber(ARGV[10]) then
    local seen = redis.call('HGETALL', KEYS[6])
    for i = 1, #seen, 2 do
      if tonumber(seen[i + 1]) < now - tonumber(ARGV[11])
          and redis.call('HEXISTS', KEYS[2], seen[i]) == 0 then
        redis.call('HDEL', KEYS[4], seen[i])
        redis.call('HDEL', KEYS[5], seen[i])
        redis.call('HDEL', KEYS[6], seen[i])
      end
    end
  end
elseif seq == last then
  granted = tonumber(redis.call('HGET', KEYS[5], holder)) or 0
end

-- A holder that is gone: whatever lease the store still counts for it goes back now, and its
-- expiry is not re-armed (a replay must not keep a dead node's budget blocked).
if ARGV[14] == '1' then
  local h = tonumber(redis.call('HGET', KEYS[2], holder)) or 0
  leased = leased - h
  redis.call('HDEL', KEYS[2], holder)
  redis.call('HDEL', KEYS[3], holder)
end

-- Spend older than the history kept goes, when a new period's spend first appears, and only
-- if the server's clock agrees the holder's period has begun (a clock far ahead must not take
-- today's spend with it).
if new_period and tonumber(ARGV[22]) > 0 and tonumber(t[1]) + 3600 >= tonumber(ARGV[22]) then
  local oldest = period - tonumber(ARGV[20])
  local fields = redis.call('HKEYS', KEYS[1])
  for i = 1, #fields do
    local p = tonumber(string.match(fields[i], '^spent:(%d+)$') or string.match(fields[i], '^base:(%d+)$'))
    if p and p < oldest then
      redis.call('HDEL', KEYS[1], fields[i])
    end
  end
end

local spent = tonumber(redis.call('HGET', KEYS[1], 'spent:' .. ARGV[4])) or 0
local squeezed = 0
if (tonumber(redis.call('HGET', KEYS[1], 'squeeze')) or 0) > now then
  squeezed = 1
end

-- An account with nothing in it (no spend, no admin limit, no lease) does not outlive its idle
-- time; one the upstream refused goes at once. Anything else is kept. An account that keeps no
-- history (a rate limit's minutes) is idle whatever it spent.
local idle = leased <= 0 and redis.call('HEXISTS', KEYS[1], 'limit') == 0
if idle and ARGV[20] ~= '0' then
  local fields = redis.call('HGETALL', KEYS[1])
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 6) == 'spent:' and tonumber(fields[i + 1]) > 0 then
      idle = false
    end
  end
end
if idle and ARGV[15] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
  epoch = ''
elseif idle then
  for i = 1, 6 do
    redis.call('PEXPIRE', KEYS[i], ARGV[21])
  end
elseif redis.call('PTTL', KEYS[4]) >= 0 then
  for i = 1, 6 do
    redis.call('PERSIST', KEYS[i])
  end
end

local mine = tonumber(redis.call('HGET', KEYS[2], holder)) or 0
return {granted, limit, spent, math.max(leased, 0), squeezed, lost, epoch, mine}
