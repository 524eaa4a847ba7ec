//! Streams open at once, per key: each holds a task and a page of output,
//! so a client that opens many and reads none is stopped here, whichever
//! door it uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Error, Result};

/// Streams at most this many per key at once.
pub const STREAMS_PER_KEY: usize = 16;

#[derive(Clone)]
pub struct StreamSlots {
    per_key: usize,
    used: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open stream; the slot frees itself when the stream ends.
pub struct Slot {
    slots: StreamSlots,
    key: String,
}

impl StreamSlots {
    pub fn new(per_key: usize) -> StreamSlots {
        StreamSlots {
            per_key,
            used: Arc::default(),
        }
    }

    fn used(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        match self.used.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn take(&self, key: &str) -> Result<Slot> {
        let mut u = self.used();
        let n = u.entry(key.to_string()).or_insert(0);
        if *n >= self.per_key {
            return Err(Error::Busy {
                msg: format!(
                    "This API key already has {} streams open (followed logs, downloads); close one or retry later",
                    self.per_key
                ),
                retry_s: 5,
            });
        }
        *n += 1;
        Ok(Slot {
            slots: self.clone(),
            key: key.to_string(),
        })
    }

    /// Streams `key` holds open now.
    pub fn open(&self, key: &str) -> usize {
        self.used().get(key).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut u = self.slots.used();
        if let Some(n) = u.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                u.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_slots_and_each_comes_back_when_dropped() {
        let s = StreamSlots::new(2);
        let a = s.take("k").unwrap();
        let _b = s.take("k").unwrap();
        assert_eq!(s.take("k").err().map(|e| e.code()), Some(429));
        assert!(s.take("other").is_ok(), "per key");
        drop(a);
        assert_eq!(s.open("k"), 1);
        assert!(s.take("k").is_ok());
    }
}
