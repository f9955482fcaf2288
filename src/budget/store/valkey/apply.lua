local holder = ARGV[1]
local seq = tonumber(ARGV[2])
local period = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local stored_period = tonumber(redis.call('HGET', KEYS[1], 'period'))
if stored_period == nil or stored_period < period then
  redis.call('HSET', KEYS[1], 'spent', 0, 'period', period)
end

-- Lapsed leases go back; what is left sums to the key's leased total.
local leased = 0
local untils = redis.call('HGETALL', KEYS[3])
for i = 1, #untils, 2 do
  if tonumber(untils[i + 1]) < now then
    redis.call('HDEL', KEYS[2], untils[i])
    redis.call('HDEL', KEYS[3], untils[i])
  end
end
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  leased = leased + tonumber(leases[i + 1])
end

local limit = tonumber(redis.call('HGET', KEYS[1], 'limit')) or tonumber(ARGV[3])
local granted = 0
if holder ~= '' then
  local last = tonumber(redis.call('HGET', KEYS[4], holder)) or 0
  if seq > last then
    local spent = tonumber(ARGV[5])
    if spent > 0 then
      redis.call('HINCRBY', KEYS[1], 'spent', spent)
    end
    local before = tonumber(redis.call('HGET', KEYS[2], holder)) or 0
    local held = math.max(before - tonumber(ARGV[6]) - tonumber(ARGV[7]), 0)
    leased = leased - before + held
    local parts = tonumber(ARGV[9])
    if parts > 0 then
      local need = tonumber(ARGV[8])
      local unleased = limit - tonumber(redis.call('HGET', KEYS[1], 'spent')) - leased
      if unleased >= need then
        granted = need + math.floor((unleased - need) / parts)
      elseif need > 0 and leased > held then
        -- Other workers hold what this ask needs: ask them to hand back what they do not use.
        redis.call('HSET', KEYS[1], 'squeeze', now + tonumber(ARGV[13]))
      end
    end
    held = held + granted
    leased = leased + granted
    if held > 0 then
      redis.call('HSET', KEYS[2], holder, held)
      redis.call('HSET', KEYS[3], holder, now + tonumber(ARGV[10]))
    else
      redis.call('HDEL', KEYS[2], holder)
      redis.call('HDEL', KEYS[3], holder)
    end
    redis.call('HSET', KEYS[4], holder, seq)
    redis.call('HSET', KEYS[5], holder, granted)
    redis.call('HSET', KEYS[6], holder, now)
    -- Only when a new holder appears (a node started): the scan is O(holders).
    if last == 0 and redis.call('HLEN', KEYS[6]) > tonumber(ARGV[11]) then
      local seen = redis.call('HGETALL', KEYS[6])
      for i = 1, #seen, 2 do
        if tonumber(seen[i + 1]) < now - tonumber(ARGV[12])
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
end
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent')) or 0
local squeezed = 0
if (tonumber(redis.call('HGET', KEYS[1], 'squeeze')) or 0) > now then
  squeezed = 1
end
return {granted, limit, spent, leased, squeezed}
