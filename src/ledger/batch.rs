//! A batch of outbox entries sorted for the ledger: the records to insert
//! as they are, and the entries that cannot be (invalid UTF-8, or not a
//! usage record at all), which the writer repairs or sets aside.

use std::collections::HashMap;

use super::rejects::{Hint, Problem, Raw, Unfit};
use super::{PACKED_FIELDS, Record, outbox_fields};
use crate::queue::outbox::Entry;

/// A batch read from one partition's outbox.
#[derive(Default)]
pub struct Batch {
    /// Every id read: all are acknowledged once the batch is handled.
    pub ids: Vec<String>,
    /// The records read from valid UTF-8, to insert as they are.
    pub(crate) records: Vec<Record>,
    /// The entry each record was read from, in the same order.
    pub(crate) raws: Vec<Raw>,
    /// Entries that cannot be inserted as they are.
    pub(crate) unfit: Vec<Unfit>,
}

impl Batch {
    /// Sort entries read from an outbox. Entries already deleted (written
    /// by a writer that died before acknowledging) keep only their id, so
    /// they are acknowledged instead of blocking the stream.
    pub fn from_entries(entries: Vec<Entry>) -> Batch {
        let mut batch = Batch::default();
        for e in entries {
            batch.ids.push(e.id.clone());
            if let Some(fields) = e.fields {
                batch.add(Raw { id: e.id, fields });
            }
        }
        batch
    }
}

impl Batch {
    /// Sort one entry: a record to insert, or an entry to repair or set aside.
    fn add(&mut self, raw: Raw) {
        let mut utf8 = true;
        let mut named = HashMap::new();
        for kv in raw.fields.chunks(2) {
            if let [k, v] = kv {
                named.insert(text(k, &mut utf8), text(v, &mut utf8));
            }
        }
        let problem = match Record::from_fields(&named) {
            Some(r) if utf8 => {
                self.records.push(r);
                self.raws.push(raw);
                return;
            }
            Some(r) => Problem::NotUtf8(Box::new(r)),
            None => Problem::Malformed {
                why: why_malformed(&named),
                hint: Hint::of_fields(&outbox_fields(named)),
            },
        };
        self.unfit.push(Unfit { raw, problem });
    }
}

/// A stream field as text; invalid UTF-8 is replaced (and `utf8` cleared).
fn text(b: &[u8], utf8: &mut bool) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => {
            *utf8 = false;
            String::from_utf8_lossy(b).into_owned()
        }
    }
}

/// Why an entry's fields are not a usage record, for the rejects table.
fn why_malformed(fields: &HashMap<String, String>) -> String {
    let want = PACKED_FIELDS.len();
    if let Some(packed) = fields.get("r") {
        let n = packed.splitn(want, '\t').count();
        if n < want {
            return format!("malformed outbox entry: {n} of {want} packed values");
        }
    }
    let named = outbox_fields(fields.clone());
    let attempt = named.get("attempt").and_then(|a| a.parse::<i32>().ok());
    if !named.contains_key("job") {
        "malformed outbox entry: no job id".into()
    } else if attempt.is_none_or(|a| a < 1) {
        format!(
            "malformed outbox entry: attempt {:?} is not a number of 1 or more",
            named.get("attempt").map_or("", |a| a.as_str())
        )
    } else {
        "malformed outbox entry: no outcome".into()
    }
}
