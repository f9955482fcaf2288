#!lua flags=no-writes
-- One key's totals, read only (the admin API and /v1/usage never write).
-- KEYS: 1 aura:{K}, 2 :lease, 3 :until.  ARGV: 1 configured limit, 2 period.
-- Returns {limit, spent in the period, leased (lapsed leases left out), the account's fields...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leased = 0
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  local untils = tonumber(redis.call('HGET', KEYS[3], leases[i])) or 0
  if untils >= now then
    leased = leased + tonumber(leases[i + 1])
  end
end
local fields = redis.call('HGETALL', KEYS[1])
local limit = tonumber(ARGV[1])
local spent = 0
-- The layout before spend was kept per period.
local old_spent, old_period = nil, nil
for i = 1, #fields, 2 do
  if fields[i] == 'limit' then
    limit = tonumber(fields[i + 1])
  elseif fields[i] == 'spent:' .. ARGV[2] then
    spent = spent + tonumber(fields[i + 1])
  elseif fields[i] == 'spent' then
    old_spent = tonumber(fields[i + 1])
  elseif fields[i] == 'period' then
    old_period = fields[i + 1]
  end
end
if old_spent and (old_period == nil or old_period == ARGV[2]) then
  spent = spent + old_spent
end
local out = {limit, spent, leased}
for i = 1, #fields do
  out[#out + 1] = fields[i]
end
return out
