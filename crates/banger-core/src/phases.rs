//! Where a long operation's time goes: named phases, logged as one line so a
//! benchmark (or a user with a slow pull) can read the breakdown.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PhaseClock {
    started: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl Default for PhaseClock {
    fn default() -> Self {
        let now = Instant::now();
        PhaseClock {
            started: now,
            last: now,
            phases: Vec::new(),
        }
    }
}

impl PhaseClock {
    /// Ends the phase running since the last lap and names it.
    pub fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.add(phase, now - self.last);
        self.last = now;
    }

    /// Adds time measured elsewhere to a phase (summed with what it has).
    pub fn add(&mut self, phase: &'static str, took: Duration) {
        match self.phases.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, total)) => *total += took,
            None => self.phases.push((phase, took)),
        }
    }

    /// Takes another clock's phases in after this one's.
    pub fn absorb(&mut self, other: &PhaseClock) {
        for (phase, took) in &other.phases {
            self.add(phase, *took);
        }
        self.last = Instant::now();
    }

    /// `resolve=12ms config=3ms … total=3512ms`.
    pub fn summary(&self) -> String {
        let mut out: Vec<String> = self
            .phases
            .iter()
            .map(|(p, d)| format!("{p}={}ms", d.as_millis()))
            .collect();
        out.push(format!("total={}ms", self.started.elapsed().as_millis()));
        out.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_and_added_time_sum_per_phase_in_first_seen_order() {
        let mut clock = PhaseClock::default();
        clock.add("flatten", Duration::from_millis(5));
        clock.add("wait", Duration::from_millis(2));
        clock.add("flatten", Duration::from_millis(7));
        clock.lap("record");
        let summary = clock.summary();
        assert!(
            summary.starts_with("flatten=12ms wait=2ms record="),
            "{summary}"
        );
        assert!(summary.contains(" total="), "{summary}");
    }
}
