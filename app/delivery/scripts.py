"""The Lua scripts of the delivery path. Redis runs each as one unit, and persists and
replicates its writes together, so no crash or restart can leave half of a step done.

The records (all keys under the channel's key prefix):

- kombu's own `unacked` hash (tag -> `[message, exchange, routing key]`) and its index (tag ->
  time), so that kombu's acknowledgement, restore and a stock kombu worker keep working. The
  exchange is always "" and the routing key the queue the message was taken from: a restore
  puts it back on that queue, never on every queue its exchange is bound to.
- `jobs_service:inflight` (tag -> `[worker, list key, delivery counter key, suffix length]`):
  who holds the delivery and where it came from.
- `jobs_service:held:<worker>`: the tags one worker holds, for its recovery.
- `jobs_service:workers`: each worker's last heartbeat, in Redis's own clock.
- `jobs_service:deliveries:<sha1 of the message>`: how many of the message's deliveries ended
  in the death of the process holding it (a whole worker whose heartbeat lapsed, counted by
  the recovery; a pool process, counted when the worker requeues it); at the poison limit it is not
  handed out again.
- `jobs_service:rejected`: messages taken out of circulation (malformed, poison) waiting to be
  written to the dead-letter store, each as `<JSON header>\\n<raw message>`.
- `jobs_service:paused`: the names of paused queues.

The message itself is never decoded and encoded again: every restore pushes back the bytes the
producer sent (the `unacked` record is `[` + message + a suffix of known length).
"""

from __future__ import annotations

#: Acknowledges recorded deliveries (SETTLE's "ack", per tag): the tags in ARGV from `first`
#: on, `held_set` the held sets' key prefix. KEYS[1..3]: unacked, unacked index, inflight.
#: Returns the tags whose records were gone (another worker recovered them meanwhile).
_ACKNOWLEDGE = """
local function acknowledge(first, held_set)
  local gone = {}
  for a = first, #ARGV do
    local tag = ARGV[a]
    local info = redis.call('HGET', KEYS[3], tag)
    if info then
      local held = cjson.decode(info)
      redis.call('DEL', held[3])
      redis.call('HDEL', KEYS[3], tag)
      redis.call('SREM', held_set .. held[1], tag)
    else
      gone[#gone + 1] = tag
    end
    redis.call('HDEL', KEYS[1], tag)
    redis.call('ZREM', KEYS[2], tag)
  end
  return gone
end
"""

#: KEYS: unacked, unacked index, inflight, held set, workers, rejected, paused, queue lists...
#: ARGV: index time (the client's clock, as kombu's records), the first delivery tag's number,
#: the most messages to hand out, "1" if the worker holds no delivery (bar the acknowledged),
#: the delivery tags' prefix (`<worker>.`), worker id, poison limit (deaths of its holder after
#: which a message is not handed out again), death counter prefix, counter TTL,
#: then per queue list: the queue name it is delivered as, "1" if its consumer acknowledges;
#: then the held sets' key prefix and the tags of deliveries to acknowledge (as ACK does, after
#: the fetch: the worker's acknowledgements ride on its next fetch).
#: Takes up to that many messages from the first non-empty unpaused queue (each tag the prefix
#: and the next number). Returns {the acknowledged tags whose records were gone, the position
#: of the list (0 when every unpaused queue is empty), then per message {message, what
#: happened, delivery tag}}: 1 recorded, 0 handed out unrecorded (a no_ack consumer), 2
#: rejected (not a JSON object), 3 rejected (poison), 4 recorded, on its last chance (one
#: death from the poison limit): it runs alone. Such a message is handed out only to a worker
#: that holds nothing, and alone; where it is next in the queue and the worker holds
#: something, the batch ends there with {"", 5, ""}: the worker takes nothing more until it
#: holds nothing. So the death that dead-letters a message is always its own, never that of a
#: worker another job took down while it waited beside it. Each message is popped last: Redis
#: keeps a script's earlier writes when a later command fails (a full `noeviction` server
#: refuses ZADD and HSET, never RPOP), so a failed record leaves the message in its queue. A
#: refusal on the first message fails the script (nothing taken, nothing acknowledged); on a
#: later one it ends the batch with what was taken, all of it recorded.
FETCH = (
    _ACKNOWLEDGE
    + """
local queues = #KEYS - 7
local most = tonumber(ARGV[3])
local limit = tonumber(ARGV[7])
local function take()
  for i = 1, queues do
    local key = KEYS[7 + i]
    local queue = ARGV[8 + 2 * i]
    if redis.call('SISMEMBER', KEYS[7], queue) == 0 and redis.call('LLEN', key) > 0 then
      local taken = {i}
      local number = tonumber(ARGV[2])
      local beat = false
      local recorded = 0
      for n = 1, most do
        local item = redis.call('LINDEX', key, -1)
        if not item then
          break
        end
        local tag = ARGV[5] .. (number + n - 1)
        if ARGV[9 + 2 * i] ~= '1' then
          redis.call('RPOP', key)
          taken[#taken + 1] = {item, 0, tag}
        else
          local ok, message = pcall(cjson.decode, item)
          if not (ok and type(message) == 'table') then
            redis.call('LPUSH', KEYS[6], cjson.encode({queue = queue, tag = tag,
              reason = 'not a JSON object'}) .. '\\n' .. item)
            redis.call('RPOP', key)
            taken[#taken + 1] = {item, 2, tag}
          else
            local counter = ARGV[8] .. redis.sha1hex(item)
            local deaths = tonumber(redis.call('GET', counter) or '0')
            local last = deaths > 0 and deaths + 1 >= limit
            if deaths >= limit then
              redis.call('LPUSH', KEYS[6], cjson.encode({queue = queue, tag = tag,
                reason = 'poison', deaths = deaths}) .. '\\n' .. item)
              redis.call('DEL', counter)
              redis.call('RPOP', key)
              taken[#taken + 1] = {item, 3, tag}
            elseif last and (recorded > 0 or ARGV[4] ~= '1') then
              taken[#taken + 1] = {'', 5, ''}
              break
            else
              if n == 1 then
                redis.call('ZADD', KEYS[2], ARGV[1], tag)
              else
                local added = redis.pcall('ZADD', KEYS[2], ARGV[1], tag)
                if type(added) == 'table' and added['err'] then
                  break
                end
              end
              local suffix = ',"",' .. cjson.encode(queue) .. ']'
              redis.call('HSET', KEYS[1], tag, '[' .. item .. suffix)
              redis.call('HSET', KEYS[3], tag, cjson.encode({ARGV[6], key, counter, #suffix}))
              redis.call('SADD', KEYS[4], tag)
              if not beat then
                local now = redis.call('TIME')
                redis.call('ZADD', KEYS[5], now[1] + now[2] / 1000000, ARGV[6])
                beat = true
              end
              redis.call('RPOP', key)
              recorded = recorded + 1
              if last then
                taken[#taken + 1] = {item, 4, tag}
                break
              end
              taken[#taken + 1] = {item, 1, tag}
            end
          end
        end
      end
      return taken
    end
  end
  return {0}
end
local taken = take()
table.insert(taken, 1, acknowledge(11 + 2 * queues, ARGV[10 + 2 * queues]))
return taken
"""
)

#: Ends a delivery this transport recorded.
#: KEYS: unacked, unacked index, inflight. ARGV: tag, how ("ack"; "head" or "tail": put the
#: message back at that end of its queue), "1" if the delivery ended in the death of the
#: process running it (counted towards the poison limit), held-set prefix, counter TTL.
#: Returns 0 when the records were gone: another worker recovered the message meanwhile.
SETTLE = """
local info = redis.call('HGET', KEYS[3], ARGV[1])
if not info then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
local held = cjson.decode(info)
if ARGV[2] == 'ack' then
  redis.call('DEL', held[3])
else
  local record = redis.call('HGET', KEYS[1], ARGV[1])
  if record then
    local item = string.sub(record, 2, #record - held[4])
    if ARGV[2] == 'head' then
      redis.call('RPUSH', held[2], item)
    else
      redis.call('LPUSH', held[2], item)
    end
  end
  if ARGV[3] == '1' then
    redis.call('INCR', held[3])
    redis.call('EXPIRE', held[3], ARGV[5])
  end
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[4] .. held[1], ARGV[1])
return 1
"""

#: Acknowledges recorded deliveries, several in one call (see _ACKNOWLEDGE).
#: KEYS: unacked, unacked index, inflight. ARGV: held-set prefix, then the tags.
#: Returns the tags whose records were gone (another worker recovered them meanwhile).
ACK = (
    _ACKNOWLEDGE
    + """
return acknowledge(2, ARGV[1])
"""
)

#: Takes a recorded delivery out of circulation, to the rejected list.
#: KEYS: unacked, unacked index, inflight, rejected. ARGV: tag, JSON header, held-set prefix.
#: Returns 0 when the records were gone.
QUARANTINE = """
local info = redis.call('HGET', KEYS[3], ARGV[1])
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not (info and record) then
  return 0
end
local held = cjson.decode(info)
redis.call('LPUSH', KEYS[4], ARGV[2] .. '\\n' .. string.sub(record, 2, #record - held[4]))
redis.call('DEL', held[3])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', ARGV[3] .. held[1], ARGV[1])
return 1
"""

#: A worker's heartbeat, in Redis's clock. KEYS: workers, the worker's info key.
#: ARGV: worker id, info (JSON: host, pid, queues), info TTL.
#: Returns 1 when the worker was not registered (new, or found dead and recovered meanwhile).
HEARTBEAT = """
local now = redis.call('TIME')
local added = redis.call('ZADD', KEYS[1], now[1] + now[2] / 1000000, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return added
"""

#: Forgets a worker that stopped and holds nothing. KEYS: workers, its held set, its info key.
#: ARGV: worker id. A worker that still holds messages is left to lapse and be recovered.
RETIRE = """
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""

#: Puts back what workers whose heartbeat lapsed held, at the head of the queues it came from,
#: and forgets those workers. KEYS: workers, inflight, unacked, unacked index.
#: ARGV: seconds without a heartbeat that make a worker dead, held-set prefix, info prefix,
#: most workers to recover in one call, death counter TTL.
#: Returns {worker, messages put back, ...}.
RECOVER = """
local now = redis.call('TIME')
local ceil = now[1] + now[2] / 1000000 - tonumber(ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ceil, 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, worker in ipairs(dead) do
  local held = ARGV[2] .. worker
  local restored = 0
  for _, tag in ipairs(redis.call('SMEMBERS', held)) do
    local info = redis.call('HGET', KEYS[2], tag)
    if info then
      local record = redis.call('HGET', KEYS[3], tag)
      local h = cjson.decode(info)
      if record then
        redis.call('RPUSH', h[2], string.sub(record, 2, #record - h[4]))
        redis.call('INCR', h[3])
        redis.call('EXPIRE', h[3], ARGV[5])
        restored = restored + 1
      end
      redis.call('HDEL', KEYS[2], tag)
    end
    redis.call('HDEL', KEYS[3], tag)
    redis.call('ZREM', KEYS[4], tag)
  end
  redis.call('DEL', held, ARGV[3] .. worker)
  redis.call('ZREM', KEYS[1], worker)
  table.insert(out, worker)
  table.insert(out, restored)
end
return out
"""

#: kombu's visibility-timeout scan, narrowed to the records no live worker owns.
#: KEYS: unacked index, inflight, workers. ARGV: ceiling time, how many, now (client clock).
#: A record this transport made is left to its owner's heartbeat: its index time is reset so
#: it leaves the scan window, and an owner unknown to the heartbeat set is entered there as
#: long dead, so that the next recovery takes its messages back. Returns the other tags (records
#: of stock kombu clients), for kombu's own restore.
VISIBLE = """
local tags = redis.call('ZRANGE', KEYS[1], ARGV[1], 0, 'BYSCORE', 'REV', 'LIMIT', 0, ARGV[2])
local unowned = {}
for _, tag in ipairs(tags) do
  local info = redis.call('HGET', KEYS[2], tag)
  if info then
    redis.call('ZADD', KEYS[1], ARGV[3], tag)
    local owner = cjson.decode(info)[1]
    if not redis.call('ZSCORE', KEYS[3], owner) then
      redis.call('ZADD', KEYS[3], 0, owner)
    end
  else
    table.insert(unowned, tag)
  end
end
return unowned
"""

# The scheduled set ---------------------------------------------------------------------------
#
# `jobs_service:schedule` (member -> due time, in seconds since the epoch) and
# `jobs_service:schedule:messages` (member -> `<JSON header>\n<raw message>`, the header naming
# the list the message goes to when due). A member is the message's task id, or, when another
# message already waits under that id, the id and the first 12 hex digits of the message's
# SHA-1: the same message scheduled twice waits once, two different ones both wait.

#: Shared by SCHEDULE and DEFER: adds ARGV[1] (member base), due ARGV[2], header ARGV[3],
#: message `item` to KEYS[1] (the set) and KEYS[2] (its messages). Returns the member, or ''
#: when the same message already waits.
ADD_SCHEDULED = """
local function add(item)
  local member = ARGV[1]
  if member == '' then
    member = redis.sha1hex(item)
  end
  local entry = ARGV[3] .. '\\n' .. item
  local found = redis.call('HGET', KEYS[2], member)
  if found then
    if found == entry then
      return ''
    end
    member = member .. ':' .. string.sub(redis.sha1hex(item), 1, 12)
    if redis.call('HEXISTS', KEYS[2], member) == 1 then
      return ''
    end
  end
  redis.call('HSET', KEYS[2], member, entry)
  redis.call('ZADD', KEYS[1], ARGV[2], member)
  return member
end
"""

#: Puts a message into the scheduled set instead of a queue (a producer's `_put`).
#: KEYS: schedule, schedule messages. ARGV: member base (the task id, or ''), due time,
#: JSON header, the message.
SCHEDULE = ADD_SCHEDULED + "return add(ARGV[4])\n"

#: Moves a delivered message that is not due yet into the scheduled set, and ends its delivery,
#: in one step (a foreign producer's ETA message; no worker holds it until it is due).
#: KEYS: schedule, schedule messages, unacked, unacked index, inflight.
#: ARGV: member base, due time, JSON header, tag, held-set prefix.
#: Returns false when the delivery's records were gone (recovered meanwhile), else the member.
DEFER = (
    ADD_SCHEDULED
    + """
local info = redis.call('HGET', KEYS[5], ARGV[4])
local record = redis.call('HGET', KEYS[3], ARGV[4])
if not (info and record) then
  return false
end
local held = cjson.decode(info)
local member = add(string.sub(record, 2, #record - held[4]))
redis.call('DEL', held[3])
redis.call('HDEL', KEYS[5], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[4])
redis.call('ZREM', KEYS[4], ARGV[4])
redis.call('SREM', ARGV[5] .. held[1], ARGV[4])
return member
"""
)

#: Moves every due message (at most ARGV[1]) into the list its header names, in Redis's clock,
#: each exactly once however many workers poll: a member leaves the set in the step that
#: pushes its message. KEYS: schedule, schedule messages. ARGV: most to move.
#: Returns {messages moved, the next due time or '', Redis's time}.
RELEASE = """
local now = redis.call('TIME')
local t = now[1] + now[2] / 1000000
local due = redis.call('ZRANGE', KEYS[1], '-inf', t, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, member in ipairs(due) do
  local entry = redis.call('HGET', KEYS[2], member)
  if entry then
    local cut = string.find(entry, '\\n', 1, true)
    local header = cjson.decode(string.sub(entry, 1, cut - 1))
    redis.call('LPUSH', header.key, string.sub(entry, cut + 1))
    redis.call('HDEL', KEYS[2], member)
    moved = moved + 1
  end
  redis.call('ZREM', KEYS[1], member)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {moved, next[2] or '', string.format('%.6f', t)}
"""
