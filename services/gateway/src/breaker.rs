//! A circuit breaker per backend: after `threshold` consecutive failures
//! calls are refused for a cool-down, then one trial call decides.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    trial_running: bool,
    last_error: String,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

/// A refused call: how long until the next trial, and the last failure.
#[derive(Debug, Clone)]
pub struct Refused {
    pub retry_in: Duration,
    pub failures: u32,
    pub last_error: String,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State {
                failures: 0,
                open_until: None,
                trial_running: false,
                last_error: String::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go ahead now.
    pub fn admit(&self) -> Result<(), Refused> {
        let mut s = self.lock();
        match s.open_until {
            None => Ok(()),
            Some(until) => {
                let now = Instant::now();
                if now < until || s.trial_running {
                    Err(Refused {
                        retry_in: until.saturating_duration_since(now),
                        failures: s.failures,
                        last_error: s.last_error.clone(),
                    })
                } else {
                    s.trial_running = true;
                    Ok(())
                }
            }
        }
    }

    pub fn success(&self) {
        let mut s = self.lock();
        s.failures = 0;
        s.open_until = None;
        s.trial_running = false;
    }

    /// Records a failure; true when it (re)opened the circuit.
    pub fn failure(&self, error: &str) -> bool {
        let mut s = self.lock();
        s.failures = s.failures.saturating_add(1);
        s.last_error = error.to_owned();
        let was_trial = s.trial_running;
        s.trial_running = false;
        if was_trial || s.failures >= self.threshold {
            s.open_until = Some(Instant::now() + self.cooldown);
            true
        } else {
            false
        }
    }

    /// Ends a trial call that counted neither way (the caller's own error).
    pub fn neutral(&self) {
        self.lock().trial_running = false;
    }

    pub fn circuit(&self) -> Circuit {
        let s = self.lock();
        match s.open_until {
            None => Circuit::Closed,
            Some(until) if Instant::now() < until => Circuit::Open,
            Some(_) => Circuit::HalfOpen,
        }
    }

    pub fn last_error(&self) -> String {
        self.lock().last_error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_a_trial_decides() {
        let b = Breaker::new(3, Duration::from_millis(0));
        assert!(!b.failure("x"));
        assert!(!b.failure("x"));
        b.success();
        assert!(!b.failure("x"));
        assert!(!b.failure("x"));
        assert!(b.failure("boom"));
        // Cool-down of zero: half-open at once; one trial admitted, a
        // second refused while it runs.
        assert_eq!(b.circuit(), Circuit::HalfOpen);
        assert!(b.admit().is_ok());
        assert!(b.admit().is_err());
        assert!(b.failure("again"), "a failed trial reopens");
        assert!(b.admit().is_ok());
        b.success();
        assert_eq!(b.circuit(), Circuit::Closed);
        assert!(b.admit().is_ok() && b.admit().is_ok());
    }

    #[test]
    fn refuses_during_cooldown() {
        let b = Breaker::new(1, Duration::from_secs(60));
        assert!(b.failure("refused"));
        assert_eq!(b.circuit(), Circuit::Open);
        let r = b.admit().unwrap_err();
        assert_eq!(r.failures, 1);
        assert_eq!(r.last_error, "refused");
        assert!(r.retry_in > Duration::from_secs(50));
    }
}
