//! Everything one partition holds in Redis, read in one round trip by a
//! read-only Lua script, so the invariants are checked against the whole
//! state after every step. The keys to read are named by the model (every
//! job it created, every per-queue and per-tenant key of the layout): the
//! shared test Redis holds other tests' keys, and scanning it would cost
//! every step milliseconds (and block the other tests meanwhile).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use agentq::queue::Queue;
use fred::prelude::*;

/// ARGV[1]: the partition base; ARGV[2]: the last outbox id read ("-" for
/// none); then the short names of the keys to read. Replies with the new
/// outbox records, then type and contents of each key (job hashes: only the
/// fields the checks read).
const DUMP: &str = r#"
local base = ARGV[1]
local from = (ARGV[2] == '-') and '-' or ('(' .. ARGV[2])
local out = { redis.call('XRANGE', base .. ':outbox', from, '+') }
for i = 3, #ARGV do
  local key = base .. ':' .. ARGV[i]
  local t = redis.call('TYPE', key).ok
  local v = {}
  if t == 'hash' and ARGV[i]:sub(1, 4) == 'job:' then
    local f = { 'state', 'attempts', 'base', 'worker', 'cancel' }
    local got = redis.call('HMGET', key, unpack(f))
    for j = 1, #f do
      if got[j] then v[#v + 1] = f[j]; v[#v + 1] = got[j] end
    end
  elseif t == 'hash' then v = redis.call('HGETALL', key)
  elseif t == 'zset' then v = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  elseif t == 'set' then v = redis.call('SMEMBERS', key)
  elseif t == 'string' then v = { redis.call('GET', key) }
  end
  out[#out + 1] = t
  out[#out + 1] = v
end
return out
"#;

#[derive(Clone, Debug)]
pub enum Val {
    Hash(BTreeMap<String, String>),
    Zset(Vec<(String, f64)>),
    Set(BTreeSet<String>),
    Str(String),
    Other,
}

/// One partition's keys, named without the base (`job:<id>`, `q:a:sched`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub keys: BTreeMap<String, Val>,
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        Value::Integer(n) => n.to_string(),
        Value::Double(d) => d.to_string(),
        _ => String::new(),
    }
}

fn items(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().map(text).collect(),
        _ => Vec::new(),
    }
}

fn parse(kind: &str, v: &Value) -> Val {
    let flat = items(v);
    match kind {
        "hash" => Val::Hash(
            flat.chunks(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect(),
        ),
        "zset" => Val::Zset(
            flat.chunks(2)
                .map(|c| (c[0].clone(), c[1].parse().expect("zset score")))
                .collect(),
        ),
        "set" => Val::Set(flat.into_iter().collect()),
        "string" => Val::Str(flat.into_iter().next().unwrap_or_default()),
        _ => Val::Other,
    }
}

impl Snapshot {
    /// Read `keys` (short names) of partition `p`, and the outbox records
    /// after `last` (a stream id, "-" for the start); returns the snapshot,
    /// the new records and the id of the last one.
    pub async fn read(
        queue: &Queue,
        p: u32,
        keys: &[String],
        last: &str,
    ) -> (Snapshot, Vec<HashMap<String, String>>, String) {
        let base = queue.keys(p).base().to_string();
        let mut args = vec![base, last.to_string()];
        args.extend(keys.iter().cloned());
        let reply: Value = queue
            .client()
            .eval(DUMP, Vec::<String>::new(), args)
            .await
            .expect("dump the partition");
        let Value::Array(flat) = reply else {
            panic!("dump replied {reply:?}");
        };
        let (records, last) = outbox(&flat[0], last);
        let mut out = BTreeMap::new();
        for (name, c) in keys.iter().zip(flat[1..].chunks(2)) {
            let kind = text(&c[0]);
            if kind != "none" {
                out.insert(name.clone(), parse(&kind, &c[1]));
            }
        }
        (Snapshot { keys: out }, records, last)
    }

    pub fn hash(&self, key: &str) -> BTreeMap<String, String> {
        match self.keys.get(key) {
            Some(Val::Hash(h)) => h.clone(),
            _ => BTreeMap::new(),
        }
    }

    pub fn zset(&self, key: &str) -> Vec<(String, f64)> {
        match self.keys.get(key) {
            Some(Val::Zset(z)) => z.clone(),
            _ => Vec::new(),
        }
    }

    pub fn zmap(&self, key: &str) -> HashMap<String, f64> {
        self.zset(key).into_iter().collect()
    }

    pub fn string(&self, key: &str) -> Option<String> {
        match self.keys.get(key) {
            Some(Val::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn set(&self, key: &str) -> BTreeSet<String> {
        match self.keys.get(key) {
            Some(Val::Set(s)) => s.clone(),
            _ => BTreeSet::new(),
        }
    }
}

/// Outbox entries (XRANGE reply) as field maps, and the last id.
fn outbox(v: &Value, last: &str) -> (Vec<HashMap<String, String>>, String) {
    let Value::Array(entries) = v else {
        return (Vec::new(), last.to_string());
    };
    let mut records = Vec::new();
    let mut last = last.to_string();
    for e in entries {
        let Value::Array(pair) = e else { continue };
        last = text(&pair[0]);
        let flat = items(&pair[1]);
        let fields = flat
            .chunks(2)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect();
        records.push(agentq::model::record::outbox_fields(fields));
    }
    (records, last)
}
