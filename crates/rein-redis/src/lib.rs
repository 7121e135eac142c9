//! Rein's shared counters on Redis, for several Rein processes serving the same tenants.
//!
//! Each operation is one Lua script, which Redis runs atomically: a reservation checks and
//! holds every scope in one step, so racing processes can never both take the last of a
//! budget. Keys live under a prefix (`rein` by default):
//! - `PREFIX:budget:SCOPE`: hash of `spent_micros`, `spent_tokens`, `reserved_micros`,
//!   `reserved_tokens`; it expires 8 days after its last change (longer than any daily
//!   window, so only idle session scopes are ever forgotten);
//! - `PREFIX:resv:ID`: hash of scope → `micros:tokens` held by reservation ID;
//! - `PREFIX:resv-expiry`: sorted set of reservation ids by expiry time.
//!
//! The scripts touch keys they compute, so they target a single Redis (or a replicated
//! primary), not Redis Cluster. This crate depends on the core only.

use redis::Script;
use redis::aio::ConnectionManager;
use rein_core::Usd;
use rein_core::budget::{
    Amount, BoxFuture, Cap, Counters, CountersError, Reservation, Scope, Standing,
};

/// Releases every reservation that expired by Redis's own clock (`TIME`), so processes whose
/// clocks disagree never release each other's live reservations; ARGV[1] is the key prefix and
/// ARGV[2] the caller's clock, used only to turn its expiry time into a duration.
const RELEASE_EXPIRED: &str = r"
-- `0 - x`, never `-x`: Lua prints negative zero as -0, which Redis rejects as an integer.
local prefix = ARGV[1]
local zkey = prefix .. ':resv-expiry'
local clock = redis.call('TIME')
local server_now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', zkey, '-inf', server_now)) do
  local rkey = prefix .. ':resv:' .. rid
  local held = redis.call('HGETALL', rkey)
  for i = 1, #held, 2 do
    local bkey = prefix .. ':budget:' .. held[i]
    local m, t = string.match(held[i + 1], '(-?%d+):(-?%d+)')
    redis.call('HINCRBY', bkey, 'reserved_micros', 0 - tonumber(m))
    redis.call('HINCRBY', bkey, 'reserved_tokens', 0 - tonumber(t))
  end
  redis.call('DEL', rkey)
  redis.call('ZREM', zkey, rid)
end
local function num(v) if v then return tonumber(v) else return 0 end end
local function standing(scope)
  local v = redis.call('HMGET', prefix .. ':budget:' .. scope, 'spent_micros', 'spent_tokens', 'reserved_micros', 'reserved_tokens')
  return num(v[1]), num(v[2]), num(v[3]), num(v[4])
end
";

/// ARGV: prefix, now, id, expires, micros, tokens, then (scope, cap_micros, cap_tokens) per
/// scope, a cap of -1 meaning none. Returns {1} when granted, or {0, index, spent_micros,
/// spent_tokens, reserved_micros, reserved_tokens} for the first scope that cannot cover it.
const RESERVE: &str = r"
local id = ARGV[3]
local expires = server_now + math.max(0, tonumber(ARGV[4]) - tonumber(ARGV[2]))
local micros, tokens = tonumber(ARGV[5]), tonumber(ARGV[6])
local n = (#ARGV - 6) / 3
for i = 0, n - 1 do
  local scope = ARGV[7 + i * 3]
  local cap_m, cap_t = tonumber(ARGV[8 + i * 3]), tonumber(ARGV[9 + i * 3])
  local sm, st, rm, rt = standing(scope)
  if (cap_m >= 0 and sm + rm + micros > cap_m) or (cap_t >= 0 and st + rt + tokens > cap_t) then
    return {0, i, sm, st, rm, rt}
  end
end
local rkey = prefix .. ':resv:' .. id
for i = 0, n - 1 do
  local scope = ARGV[7 + i * 3]
  local bkey = prefix .. ':budget:' .. scope
  redis.call('HINCRBY', bkey, 'reserved_micros', micros)
  redis.call('HINCRBY', bkey, 'reserved_tokens', tokens)
  redis.call('HSET', rkey, scope, micros .. ':' .. tokens)
  redis.call('EXPIRE', bkey, 691200)
end
redis.call('ZADD', zkey, expires, id)
return {1}
";

/// ARGV: prefix, now, id, micros, tokens, then the scopes. Releases what reservation id still
/// holds in each scope, adds the actual spend, and returns the four counters of each scope.
const SETTLE: &str = r"
local id = ARGV[3]
local micros, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
local rkey = prefix .. ':resv:' .. id
-- Idempotent: a reservation is settled once; a repeat only reports the standings.
local first = redis.call('SET', prefix .. ':settled:' .. id, '1', 'NX', 'EX', 691200)
if not first then micros, tokens = 0, 0 end
for i = 6, #ARGV do
  local scope = ARGV[i]
  local bkey = prefix .. ':budget:' .. scope
  local held = first and redis.call('HGET', rkey, scope)
  if held then
    local m, t = string.match(held, '(-?%d+):(-?%d+)')
    redis.call('HINCRBY', bkey, 'reserved_micros', 0 - tonumber(m))
    redis.call('HINCRBY', bkey, 'reserved_tokens', 0 - tonumber(t))
  end
  redis.call('HINCRBY', bkey, 'spent_micros', micros)
  redis.call('HINCRBY', bkey, 'spent_tokens', tokens)
  redis.call('EXPIRE', bkey, 691200)
end
redis.call('DEL', rkey)
redis.call('ZREM', zkey, id)
local after = {}
for i = 6, #ARGV do
  local sm, st, rm, rt = standing(ARGV[i])
  table.insert(after, sm); table.insert(after, st); table.insert(after, rm); table.insert(after, rt)
end
return after
";

/// ARGV: prefix, now, scope. Returns {spent_micros, spent_tokens, reserved_micros, reserved_tokens}.
const STANDING: &str = r"
local sm, st, rm, rt = standing(ARGV[3])
return {sm, st, rm, rt}
";

/// ARGV: prefix, key, expect_absent (`1` or `0`), expected, new. Sets the cell to new only if
/// it holds expected (or is absent when expect_absent); returns 1 if it did.
const SWAP_CELL: &str = r"
local k = ARGV[1] .. ':cell:' .. ARGV[2]
local cur = redis.call('GET', k)
if ARGV[3] == '1' then
  if cur then return 0 end
elseif cur ~= ARGV[4] then
  return 0
end
redis.call('SET', k, ARGV[5])
return 1
";

/// Budget counters in Redis.
#[derive(Clone)]
pub struct RedisCounters {
    conn: ConnectionManager,
    prefix: String,
    reserve: Script,
    settle: Script,
    standing: Script,
    swap_cell: Script,
}

fn err(e: redis::RedisError) -> CountersError {
    CountersError(format!("redis: {e}"))
}

fn cap_arg(v: Option<i64>) -> i64 {
    v.unwrap_or(-1)
}

fn standing_from(v: &[i64]) -> Standing {
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Standing {
        spent: Amount {
            usd: Usd::from_micros(at(0)),
            tokens: at(1).max(0) as u64,
        },
        reserved: Amount {
            usd: Usd::from_micros(at(2)),
            tokens: at(3).max(0) as u64,
        },
    }
}

impl RedisCounters {
    /// Connects to `url` (`redis://127.0.0.1:6379`); keys go under `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, CountersError> {
        let client = redis::Client::open(url).map_err(err)?;
        // The client's default of 500 ms per answer counts the time a busy process takes to get
        // back to the answer, not only Redis's: under load, runs failed on answers that had
        // arrived. A run's own deadline still bounds the wait.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(err)?;
        Ok(RedisCounters {
            conn,
            prefix: prefix.to_string(),
            reserve: Script::new(&format!("{RELEASE_EXPIRED}{RESERVE}")),
            settle: Script::new(&format!("{RELEASE_EXPIRED}{SETTLE}")),
            standing: Script::new(&format!("{RELEASE_EXPIRED}{STANDING}")),
            swap_cell: Script::new(SWAP_CELL),
        })
    }
}

fn tokens_arg(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Counters for RedisCounters {
    fn cell<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, CountersError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("GET")
                .arg(format!("{}:cell:{key}", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(err)
        })
    }

    fn swap_cell<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a str>,
        new: &'a str,
    ) -> BoxFuture<'a, Result<bool, CountersError>> {
        Box::pin(async move {
            let mut call = self.swap_cell.prepare_invoke();
            call.arg(&self.prefix)
                .arg(key)
                .arg(if expected.is_none() { "1" } else { "0" })
                .arg(expected.unwrap_or(""))
                .arg(new);
            let mut conn = self.conn.clone();
            let done: i64 = call.invoke_async(&mut conn).await.map_err(err)?;
            Ok(done == 1)
        })
    }

    fn reserve<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        amount: Amount,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'a, Result<Reservation, CountersError>> {
        Box::pin(async move {
            let mut call = self.reserve.prepare_invoke();
            call.arg(&self.prefix)
                .arg(now_ms)
                .arg(id)
                .arg(expires_ms)
                .arg(amount.usd.micros())
                .arg(tokens_arg(amount.tokens));
            for scope in scopes {
                let Cap { usd, tokens } = scope.cap;
                call.arg(&scope.key)
                    .arg(cap_arg(usd.map(Usd::micros)))
                    .arg(cap_arg(tokens.map(tokens_arg)));
            }
            let mut conn = self.conn.clone();
            let reply: Vec<i64> = call.invoke_async(&mut conn).await.map_err(err)?;
            match reply.first() {
                Some(1) => Ok(Reservation::Granted),
                _ => {
                    let index = reply.get(1).copied().unwrap_or(0).max(0) as usize;
                    let scope = scopes.get(index).cloned().ok_or_else(|| {
                        CountersError("redis: unexpected reply to reserve".into())
                    })?;
                    Ok(Reservation::Refused {
                        scope,
                        standing: standing_from(reply.get(2..).unwrap_or(&[])),
                    })
                }
            }
        })
    }

    fn settle<'a>(
        &'a self,
        id: &'a str,
        scopes: &'a [Scope],
        actual: Amount,
    ) -> BoxFuture<'a, Result<Vec<Standing>, CountersError>> {
        Box::pin(async move {
            let mut call = self.settle.prepare_invoke();
            // `now` is irrelevant to settling but the shared prelude expects it: pass 0 so
            // nothing is released as expired on the way.
            call.arg(&self.prefix)
                .arg(0)
                .arg(id)
                .arg(actual.usd.micros())
                .arg(tokens_arg(actual.tokens));
            for scope in scopes {
                call.arg(&scope.key);
            }
            let mut conn = self.conn.clone();
            let reply: Vec<i64> = call.invoke_async(&mut conn).await.map_err(err)?;
            Ok(reply.chunks(4).map(standing_from).collect())
        })
    }

    fn standing<'a>(
        &'a self,
        scope_key: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Standing, CountersError>> {
        Box::pin(async move {
            let mut call = self.standing.prepare_invoke();
            call.arg(&self.prefix).arg(now_ms).arg(scope_key);
            let mut conn = self.conn.clone();
            let reply: Vec<i64> = call.invoke_async(&mut conn).await.map_err(err)?;
            Ok(standing_from(&reply))
        })
    }
}
