//! The process clock: milliseconds since first use, monotonic, never 0 (0 means "never" in the
//! atomics that store these times). Everything on the request path and in the health logic
//! takes a `now_ms` argument read from here, so tests pass their own times.
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds on the process clock (monotonic, from first use). Never 0.
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] of an instant already read: the request path reads the clock once per try and
/// derives what it needs from that (a clock read is ~90 instructions; callgrind, #13). An
/// instant before the clock's first use is 1.
pub fn ms_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| t);
    t.saturating_duration_since(epoch).as_millis() as u64 + 1
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
        let t = Instant::now();
        assert!(ms_at(t) >= b);
        assert_eq!(ms_at(t + std::time::Duration::from_millis(5)), ms_at(t) + 5);
        assert_eq!(unix_ms(UNIX_EPOCH), 0);
        assert!(unix_now_ms() > 1_600_000_000_000);
    }
}
