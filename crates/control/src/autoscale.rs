//! The KPA-style scaling decision (issue 4's core), a pure function of (metric history, now,
//! config, carried state). Not wired into the reconcile loop yet: `state::desired` still
//! decides (see the notes).
//!
//! Per revision, every tick:
//! - stable and panic averages of the observed concurrency (in flight + queued) over the stable
//!   window and over the panic window (a fraction of it);
//! - wanted = ceil(average / target), bounded per tick by the scale-up and scale-down rates;
//! - panic mode starts when the panic-window demand reaches `panic_threshold` × ready
//!   instances, and lasts until the panic window has been calm for a whole stable window;
//!   while panicking the count never goes down;
//! - a scale-down delay: the count only falls to the largest wanted within the delay;
//! - min/max, and scale to zero only after `scale_to_zero_grace_ms` without any load.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Concurrent requests per instance to aim for.
    pub target: f64,
    pub min: u32,
    pub max: u32,
    pub stable_window_ms: u64,
    /// The panic window as a percentage of the stable window.
    pub panic_window_pct: u64,
    /// Panic when panic-window demand / ready reaches this (2.0 = 200 %).
    pub panic_threshold: f64,
    /// At most this many times the ready count per tick (up), and down to ready / this.
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_down_delay_ms: u64,
    pub scale_to_zero_grace_ms: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            target: 100.0,
            min: 0,
            max: 10,
            stable_window_ms: 60_000,
            panic_window_pct: 10,
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_down_delay_ms: 0,
            scale_to_zero_grace_ms: 30_000,
        }
    }
}

/// One observation: mean concurrency (in flight + queued) over a 1-second bucket ending at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub concurrency: f64,
}

/// What the scaler carries from one tick to the next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScalerState {
    /// Set while panicking: since when, and the highest count decided during the panic.
    pub panic: Option<(u64, u32)>,
    /// Last time the panic-window demand was at the panic threshold.
    pub last_panic_signal_ms: u64,
    /// (time, wanted) inside the scale-down delay.
    pub recent: VecDeque<(u64, u32)>,
    /// Last time any load was seen.
    pub last_load_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    pub panicking: bool,
    pub stable_concurrency: f64,
    pub panic_concurrency: f64,
    pub reason: String,
}

fn average(history: &[Sample], now: u64, window: u64) -> f64 {
    let from = now.saturating_sub(window);
    let (sum, n) = history
        .iter()
        .filter(|s| s.at_ms > from && s.at_ms <= now)
        .fold((0.0, 0u32), |(s, n), x| (s + x.concurrency.max(0.0), n + 1));
    // Buckets without a sample count as zero load: divide by the window's bucket count.
    let buckets = (window / 1000).max(1) as f64;
    if n == 0 {
        0.0
    } else {
        sum / buckets.max(f64::from(n))
    }
}

/// Decides the instance count for one revision. `ready` is how many instances serve now.
pub fn decide(
    history: &[Sample],
    ready: u32,
    now: u64,
    cfg: &Config,
    st: &mut ScalerState,
) -> Decision {
    let target = cfg.target.max(0.01);
    let panic_window = (cfg.stable_window_ms * cfg.panic_window_pct / 100).max(1000);
    let stable = average(history, now, cfg.stable_window_ms);
    let panic = average(history, now, panic_window);
    if history
        .iter()
        .any(|s| s.at_ms <= now && s.at_ms + cfg.stable_window_ms > now && s.concurrency > 0.0)
    {
        let latest = history
            .iter()
            .filter(|s| s.at_ms <= now && s.concurrency > 0.0)
            .map(|s| s.at_ms)
            .max();
        if let Some(t) = latest {
            st.last_load_ms = Some(st.last_load_ms.map_or(t, |l| l.max(t)));
        }
    }
    let want_stable = (stable / target).ceil() as u32;
    let want_panic = (panic / target).ceil() as u32;
    // Rate bounds per tick, relative to what is ready.
    let base = f64::from(ready.max(1));
    let up_bound = (base * cfg.max_scale_up_rate)
        .ceil()
        .min(f64::from(u32::MAX)) as u32;
    let down_bound = (f64::from(ready) / cfg.max_scale_down_rate.max(1.0)).floor() as u32;
    let bound = |w: u32| w.min(up_bound).max(down_bound.min(w.max(down_bound)));

    // Panic mode.
    if f64::from(want_panic) / base >= cfg.panic_threshold && want_panic > 0 {
        st.last_panic_signal_ms = now;
        if st.panic.is_none() {
            st.panic = Some((now, ready));
        }
    } else if let Some((_, _)) = st.panic
        && now.saturating_sub(st.last_panic_signal_ms) >= cfg.stable_window_ms
    {
        st.panic = None;
    }
    let (mut desired, reason);
    if let Some((since, high)) = st.panic {
        let w = bound(want_panic).max(high);
        st.panic = Some((since, w));
        desired = w;
        reason = format!(
            "panic: {panic:.1} concurrent in the last {} s for target {target}",
            panic_window / 1000
        );
    } else {
        desired = bound(want_stable);
        reason = format!(
            "stable: {stable:.1} concurrent over {} s for target {target}",
            cfg.stable_window_ms / 1000
        );
    }

    // Scale-down delay: the largest wanted within the delay.
    st.recent.push_back((now, desired));
    while st
        .recent
        .front()
        .is_some_and(|(t, _)| now.saturating_sub(*t) > cfg.scale_down_delay_ms)
    {
        st.recent.pop_front();
    }
    if st.recent.len() > 256 {
        st.recent.pop_front();
    }
    desired = desired.max(st.recent.iter().map(|r| r.1).max().unwrap_or(0));

    // Scale to zero only after the grace without load.
    let mut reason = reason;
    if desired == 0 && ready > 0 {
        let idle_for = st.last_load_ms.map_or(u64::MAX, |t| now.saturating_sub(t));
        if idle_for < cfg.scale_to_zero_grace_ms {
            desired = 1;
            reason = format!(
                "idle for {} ms, keeping one until the {} ms grace",
                idle_for, cfg.scale_to_zero_grace_ms
            );
        }
    }
    let clamped = desired.clamp(cfg.min, cfg.max.max(cfg.min));
    if clamped != desired {
        reason = format!("{reason}; bounded to [{}, {}]", cfg.min, cfg.max);
    }
    Decision {
        desired: clamped,
        panicking: st.panic.is_some(),
        stable_concurrency: stable,
        panic_concurrency: panic,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn steady(from: u64, to: u64, c: f64) -> Vec<Sample> {
        (from..to)
            .step_by(1000)
            .map(|t| Sample {
                at_ms: t,
                concurrency: c,
            })
            .collect()
    }

    fn cfg() -> Config {
        Config {
            target: 10.0,
            max: 100,
            scale_to_zero_grace_ms: 30_000,
            ..Config::default()
        }
    }

    #[test]
    fn step_up_panics_then_settles_and_scales_to_zero_after_grace() {
        let c = cfg();
        let mut st = ScalerState::default();
        // A step from 0 to 100 concurrent with 1 instance ready: panic within seconds.
        let mut h = steady(1_000, 60_000, 0.0);
        h.extend(steady(60_000, 67_000, 100.0));
        let d = decide(&h, 1, 66_000, &c, &mut st);
        assert!(d.panicking, "{d:?}");
        assert_eq!(
            d.desired, 10,
            "100 concurrent / target 10, from the panic window"
        );
        // Load gone: no scale-down while panicking.
        h.extend(steady(67_000, 80_000, 0.0));
        let d = decide(&h, 10, 80_000, &c, &mut st);
        assert!(d.panicking);
        assert_eq!(d.desired, 10);
        // A stable window after the last panic signal: panic ends; the stable average decides.
        h.extend(steady(80_000, 130_000, 0.0));
        let d = decide(&h, 10, 127_000, &c, &mut st);
        assert!(!d.panicking, "{d:?}");
        assert!(d.desired <= 10);
        // Long after: zero once the grace has passed since the last load.
        let d = decide(&h, 1, 200_000, &c, &mut st);
        assert_eq!(d.desired, 0, "{d:?}");
    }

    #[test]
    fn keeps_one_inside_the_grace() {
        let c = cfg();
        let mut st = ScalerState::default();
        let mut h = steady(0, 5_000, 1.0);
        h.extend(steady(5_000, 70_000, 0.0));
        let d = decide(&h, 1, 30_000, &c, &mut st);
        assert_eq!(d.desired, 1);
        let d = decide(&h, 1, 66_000, &c, &mut st);
        assert_eq!(d.desired, 0, "{d:?}");
    }

    proptest! {
        #[test]
        fn bounded_and_monotone(
            loads in proptest::collection::vec(0.0f64..500.0, 1..90),
            extra in 0.0f64..200.0,
            min in 0u32..4, span in 1u32..50, ready in 0u32..60,
        ) {
            let c = Config { target: 10.0, min, max: min + span, ..Config::default() };
            let now = loads.len() as u64 * 1000;
            let h: Vec<Sample> = loads.iter().enumerate().map(|(i, l)| Sample { at_ms: (i as u64 + 1) * 1000, concurrency: *l }).collect();
            let more: Vec<Sample> = h.iter().map(|s| Sample { concurrency: s.concurrency + extra, ..*s }).collect();
            let a = decide(&h, ready, now, &c, &mut ScalerState::default());
            let b = decide(&more, ready, now, &c, &mut ScalerState::default());
            prop_assert!(a.desired >= min && a.desired <= min + span);
            prop_assert!(b.desired >= a.desired, "more load never asks for fewer: {a:?} {b:?}");
        }

        #[test]
        fn never_down_while_panicking(
            loads in proptest::collection::vec(0.0f64..500.0, 10..120),
        ) {
            let c = Config { target: 10.0, max: 1000, ..Config::default() };
            let mut st = ScalerState::default();
            let mut h = Vec::new();
            let mut ready = 1u32;
            let mut last: Option<(bool, u32)> = None;
            for (i, l) in loads.iter().enumerate() {
                let now = (i as u64 + 1) * 1000;
                h.push(Sample { at_ms: now, concurrency: *l });
                let d = decide(&h, ready, now, &c, &mut st);
                if let Some((true, prev)) = last && d.panicking {
                    prop_assert!(d.desired >= prev, "went down while panicking");
                }
                last = Some((d.panicking, d.desired));
                ready = d.desired;
            }
        }
    }
}
