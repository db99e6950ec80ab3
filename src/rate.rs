//! A byte-rate limit shared by every transfer in one direction (`--max-upload-rate`,
//! `--max-download-rate`).
//!
//! Each `take(n)` books `n` bytes at the limit's pace after those booked before (a virtual
//! clock, as GCRA does) and waits until its turn, less a small burst: concurrent transfers
//! share the rate, and an idle spell does not save up more than the burst.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bytes that may go at once after an idle spell.
const BURST: u64 = 256 << 10;

pub struct Rate {
    bytes_per_sec: u64,
    /// When the bytes booked so far will all have gone at the limit's pace.
    booked_until: Mutex<Instant>,
}

impl Rate {
    /// A limit of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Rate {
        Rate {
            bytes_per_sec: bytes_per_sec.max(1),
            booked_until: Mutex::new(Instant::now()),
        }
    }

    fn pace(&self, n: u64) -> Duration {
        Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64)
    }

    /// Waits until `n` more bytes may go.
    pub async fn take(&self, n: u64) {
        let turn = {
            let mut until = self.booked_until.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            *until = (*until).max(now) + self.pace(n);
            until.checked_sub(self.pace(BURST)).unwrap_or(now)
        };
        tokio::time::sleep_until(turn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bytes_go_at_the_rate_after_the_burst() {
        let r = Rate::new(1 << 20);
        let start = Instant::now();
        for _ in 0..40 {
            r.take(128 << 10).await;
        }
        // 5 MiB at 1 MiB/s, less the 256 KiB burst.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(4700) && took <= Duration::from_millis(4800),
            "{took:?}"
        );
    }
}
