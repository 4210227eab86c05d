//! The GCRA decision of [`super::gcra`] as Lua scripts, so Redis makes it
//! atomically and on its own clock for every gateway sharing a limit.

/// Takes one request and `costs[1]` tokens if both limits allow; arrival
/// times as integer microseconds of Redis' clock. Returns
/// `{allowed, now, tat_requests, tat_tokens}` (times after the decision).
pub(super) const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {now, now}
local ok = 1
for i = 1, 2 do
  local interval = tonumber(ARGV[3 * i - 2])
  if interval > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if tat < now then tat = now end
    tats[i] = tat
    if tat + tonumber(ARGV[3 * i - 1]) * interval - tonumber(ARGV[3 * i]) > now then ok = 0 end
  end
end
if ok == 1 then
  for i = 1, 2 do
    local interval = tonumber(ARGV[3 * i - 2])
    if interval > 0 then
      tats[i] = tats[i] + tonumber(ARGV[3 * i - 1]) * interval
      redis.call('SET', KEYS[i], string.format('%.0f', tats[i]),
        'PX', math.ceil((tats[i] - now) / 1000) + 1000)
    end
  end
end
return {ok, now, tats[1], tats[2]}
";

/// Moves one arrival time by `ARGV[1]` units of `ARGV[2]` microseconds (a
/// usage correction; negative gives back).
pub(super) const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
return 1
";

/// The Redis keys of a tenant's two limits; the hash tag keeps both in one
/// cluster slot, as one script needs.
pub(super) fn redis_keys(tenant: &str) -> [String; 2] {
    [
        format!("meridian:rl:{{{tenant}}}:requests"),
        format!("meridian:rl:{{{tenant}}}:tokens"),
    ]
}
