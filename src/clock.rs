//! The process clock: milliseconds since first use, monotonic, never 0 (0 means "never" in the
//! atomics that store these times). Everything on the request path and in the health logic
//! takes a `now_ms` argument read from here, so tests pass their own times.
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on the process clock (monotonic, from first use). Never 0.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Milliseconds since the Unix epoch of a wall-clock time (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_clock_is_never_zero_and_never_goes_back() {
        let a = now_ms();
        let b = now_ms();
        assert!(a > 0 && b >= a);
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert!(unix_now_ms() > 1_600_000_000_000);
    }
}
