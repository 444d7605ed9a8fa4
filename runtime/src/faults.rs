//! Faults a test injects into a debug build of `arqon` (the binary the tests
//! run), to check how the server fails where the CPU never would.
//!
//! `ARQON_TEST_FAULTS=device-lost-at-step:N`: from the Nth engine step of the
//! process on, every step fails as on a GPU whose context is lost (an illegal
//! address, a kernel fault), and the device reads as lost: the server answers
//! `/health` with 503, drains and exits with an error
//! (`tests/server_protocol.rs`).
//! Release builds compile none of it: there the variable means nothing.

/// Why engine step `step` (counted from 1) fails as on a lost device, if an
/// injected fault says it does.
pub(crate) fn device_lost_at(step: u64) -> Option<String> {
    #[cfg(debug_assertions)]
    {
        static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
        let at = AT.get_or_init(|| {
            let v = std::env::var("ARQON_TEST_FAULTS").ok()?;
            let at = parse(&v);
            if at.is_none() {
                tracing::warn!(value = %v, "ARQON_TEST_FAULTS is ignored: it takes device-lost-at-step:N");
            }
            at
        });
        at.filter(|n| step >= *n).map(|n| format!("an injected fault (ARQON_TEST_FAULTS=device-lost-at-step:{n})"))
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = step;
        None
    }
}

/// The error a step fails with under an injected fault `why`, as a lost
/// device's.
pub(crate) fn step_error(device: &candle_core::Device, why: &str) -> crate::Error {
    crate::Error::Device { device: crate::device::describe(device), reason: why.to_string() }
}

/// `device-lost-at-step:N` (N at least 1) as N.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse(v: &str) -> Option<u64> {
    v.trim().strip_prefix("device-lost-at-step:")?.parse().ok().filter(|n| *n >= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_parses_or_is_none() {
        assert_eq!(parse("device-lost-at-step:3"), Some(3));
        assert_eq!(parse(" device-lost-at-step:1\n"), Some(1));
        for bad in ["device-lost-at-step:0", "device-lost-at-step:", "device-lost", "oom-at-step:2", ""] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
