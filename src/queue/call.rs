//! Worker-side script calls that are safe to repeat.
//!
//! A reply can be lost after Redis acted: the connection drops, or the
//! client gives up waiting while Redis is still busy. The script calls are
//! never re-sent by the Redis client for that reason (its retries are off
//! for scripts, see [`super::scripts`]); instead the worker repeats the call
//! itself with the same [`Call`] id. The scripts remember each worker's last
//! claim, complete and release call (`B:calls:<worker>`), so a repeated
//! claim hands out the jobs the first one did (instead of claiming more and
//! stranding the first batch until its leases lapse), and a repeated
//! completion answers with the first one's statuses. Only once a call got
//! its reply does the worker [`Call::renew`] the id for the next one.

/// The id of one worker-side call (claim, complete or release) and the
/// worker making it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    worker: String,
    id: String,
}

impl Call {
    /// A first call by `worker`, with a fresh random id.
    pub fn new(worker: impl Into<String>) -> Call {
        Call {
            worker: worker.into(),
            id: fresh_id(),
        }
    }

    /// The worker id.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// The call id (128 random bits in hex).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next call: a new id, once the previous call got its reply.
    pub fn renew(&mut self) {
        self.id = fresh_id();
    }
}

fn fresh_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::Call;

    #[test]
    fn renewing_changes_the_id_only() {
        let mut c = Call::new("w1");
        let first = c.id().to_string();
        assert_eq!(first.len(), 32);
        c.renew();
        assert_ne!(c.id(), first);
        assert_eq!(c.worker(), "w1");
    }
}
